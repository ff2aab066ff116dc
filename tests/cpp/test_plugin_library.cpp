// ctest, no GPU and no libnvinfer needed: loads libaligner_trt_plugins_dynamic.so the way
// IPluginRegistry::loadLibrary / trtexec --dynamicPlugins do (dlopen, setLoggerFinder, getCreators) and checks the
// creators it hands over, including that creator errors reach the logger TensorRT supplies.
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
        {
            errors.emplace_back(msg);
        }
    }
    std::vector<std::string> errors;
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::printf("usage: %s libaligner_trt_plugins_dynamic.so\n", argv[0]);
        return 2;
    }
    int failures = 0;
    auto check = [&](bool ok, char const* what) {
        if (!ok)
        {
            ++failures;
            std::printf("FAIL %s\n", what);
        }
    };
    void* handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        std::printf("FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    check(getCreators != nullptr && setLoggerFinder != nullptr, "exports getCreators and setLoggerFinder");
    check(dlsym(handle, "getPluginCreators") == nullptr, "no IPluginV2 creators exported");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return 1;
    }
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 2, "two creators");
    std::vector<std::string> names;
    for (int32_t i = 0; i < count; ++i)
    {
        check(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "IPluginCreatorV3One");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        names.emplace_back(creator->getPluginName());
        check(std::strcmp(creator->getPluginNamespace(), "inferaligner") == 0, "namespace inferaligner");
        check(std::strcmp(creator->getPluginVersion(), "1") == 0, "version 1");
        // A mistyped field: refused, and the message reaches TensorRT's logger through the finder.
        int32_t wrong[3] = {1, 2, 3};
        PluginField field(names.back() == "SteerGate" ? "direction" : "vector", wrong, PluginFieldType::kINT32, 3);
        PluginFieldCollection fc{1, &field};
        logger.errors.clear();
        IPluginV3* plugin = creator->createPlugin("node", &fc, TensorRTPhase::kBUILD);
        check(plugin == nullptr, "mistyped field refused");
        check(!logger.errors.empty() && logger.errors.back().find(field.name) != std::string::npos,
            "error names the field, through the supplied logger");
        float values[3] = {0.5f, 0.5f, 0.5f};
        float bias = 0.f;
        PluginField good[2] = {PluginField(field.name, values, PluginFieldType::kFLOAT32, 3),
            PluginField("bias", &bias, PluginFieldType::kFLOAT32, 1)};
        PluginFieldCollection goodFc{names.back() == "SteerGate" ? 2 : 1, good};
        plugin = creator->createPlugin("node", &goodFc, TensorRTPhase::kBUILD);
        check(plugin != nullptr, "valid fields accepted");
        delete plugin;
    }
    check(names == std::vector<std::string>{"SteerGate", "SteerShift"}, "SteerGate and SteerShift");
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
}
