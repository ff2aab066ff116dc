// ctest, no GPU and no libnvinfer needed: loads libaligner_trt_plugins_dynamic.so the way
// IPluginRegistry::loadLibrary / trtexec --dynamicPlugins do (dlopen, setLoggerFinder, getCreators) and checks the
// creators it hands over (SteerGate 1, 2 and 3, SteerShift 1 and 2), that creator errors reach the logger TensorRT supplies,
// and the constants-digest registry the library exports (aligner_plugins_digest_*, reached through dlsym as the C
// runtime reaches it).
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

    using DigestReset = void (*)();
    using DigestCount = int32_t (*)();
    using DigestAt = int32_t (*)(int32_t, char const**, char const**, char const**, char const**);
    auto digestReset = reinterpret_cast<DigestReset>(dlsym(handle, "aligner_plugins_digest_reset"));
    auto digestCount = reinterpret_cast<DigestCount>(dlsym(handle, "aligner_plugins_digest_count"));
    auto digestAt = reinterpret_cast<DigestAt>(dlsym(handle, "aligner_plugins_digest_at"));
    check(digestReset != nullptr && digestCount != nullptr && digestAt != nullptr,
        "exports aligner_plugins_digest_reset/count/at");
    if (digestReset == nullptr || digestCount == nullptr || digestAt == nullptr)
    {
        return 1;
    }
    digestReset();

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 5, "five creators");
    std::vector<std::string> found;
    std::vector<std::string> runtimeNames;
    for (int32_t i = 0; i < count; ++i)
    {
        check(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "IPluginCreatorV3One");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string const name = creator->getPluginName();
        std::string const version = creator->getPluginVersion();
        found.push_back(name + "/" + version);
        check(std::strcmp(creator->getPluginNamespace(), "inferaligner") == 0, "namespace inferaligner");
        bool const gate = name == "SteerGate";
        char const* weightName = !gate ? "vector" : (version == "1" ? "direction" : "weight");
        // A mistyped field: refused, and the message reaches TensorRT's logger through the finder.
        int32_t wrong[3] = {1, 2, 3};
        PluginField field(weightName, wrong, PluginFieldType::kINT32, 3);
        PluginFieldCollection fc{1, &field};
        logger.errors.clear();
        IPluginV3* plugin = creator->createPlugin("node", &fc, TensorRTPhase::kBUILD);
        check(plugin == nullptr, "mistyped field refused");
        check(!logger.errors.empty() && logger.errors.back().find(weightName) != std::string::npos,
            "error names the field, through the supplied logger");
        // Valid fields: accepted in the build phase (nothing recorded) and in the runtime phase (recorded).
        float values[3] = {0.5f, 0.5f, 0.5f};
        float bias = 0.f;
        int32_t tokens = 2, normalize = 0;
        float maxValues[3] = {0.25f, -0.5f, 1.0f};
        PluginField good[5] = {PluginField(weightName, values, PluginFieldType::kFLOAT32, 3),
            PluginField("bias", &bias, PluginFieldType::kFLOAT32, 1),
            PluginField("tokens", &tokens, PluginFieldType::kINT32, 1),
            PluginField("normalize", &normalize, PluginFieldType::kINT32, 1),
            PluginField("max_weight", maxValues, PluginFieldType::kFLOAT32, 3)};
        PluginFieldCollection goodFc{!gate ? 1 : (version == "1" ? 2 : (version == "2" ? 4 : 5)), good};
        if (gate && version == "3")
        {
            // Version 3 without max_weight, or with one of another length: refused, naming the field.
            PluginFieldCollection noMax{4, good};
            logger.errors.clear();
            plugin = creator->createPlugin("node", &noMax, TensorRTPhase::kBUILD);
            check(plugin == nullptr && !logger.errors.empty()
                    && logger.errors.back().find("max_weight") != std::string::npos,
                "SteerGate 3 without max_weight refused");
            good[4].length = 2;
            logger.errors.clear();
            plugin = creator->createPlugin("node", &goodFc, TensorRTPhase::kBUILD);
            check(plugin == nullptr && !logger.errors.empty()
                    && logger.errors.back().find("max_weight") != std::string::npos,
                "SteerGate 3 with a max_weight of another length refused");
            good[4].length = 3;
        }
        plugin = creator->createPlugin("node", &goodFc, TensorRTPhase::kBUILD);
        check(plugin != nullptr, "valid fields accepted");
        delete plugin;
        std::string const nodeName = "/model/layers." + std::to_string(i) + "/steer/" + name;
        plugin = creator->createPlugin(nodeName.c_str(), &goodFc, TensorRTPhase::kRUNTIME);
        check(plugin != nullptr, "valid fields accepted in the runtime phase");
        delete plugin;
        runtimeNames.push_back(nodeName + " " + name + " " + version);
    }
    check(found == std::vector<std::string>{"SteerGate/1", "SteerGate/2", "SteerGate/3", "SteerShift/1",
              "SteerShift/2"},
        "SteerGate versions 1, 2 and 3, SteerShift versions 1 and 2");

    // The registry holds one entry per runtime-phase plugin, in creation order, each with a 64-digit lowercase hex
    // digest; the gates' constants differ from each other and from the shifts', so do the digests, and the two
    // SteerShift versions, given the same field, digest it alike.
    check(digestCount() == static_cast<int32_t>(runtimeNames.size()), "one registry entry per runtime-phase plugin");
    std::vector<std::string> hexes;
    for (int32_t i = 0; i < digestCount(); ++i)
    {
        char const *name = nullptr, *op = nullptr, *version = nullptr, *hex = nullptr;
        check(digestAt(i, &name, &op, &version, &hex) == 0, "registry entry readable");
        check(std::string(name) + " " + op + " " + version == runtimeNames[i], "registry entry name, op and version");
        std::string const digest = hex;
        check(digest.size() == 64 && digest.find_first_not_of("0123456789abcdef") == std::string::npos,
            "digest is lowercase hex sha256");
        hexes.push_back(digest);
    }
    check(hexes.size() == 5 && hexes[0] != hexes[1] && hexes[1] != hexes[2] && hexes[0] != hexes[2]
            && hexes[2] != hexes[3] && hexes[3] == hexes[4],
        "different constants, different digests; the same vector, the same digest");
    digestReset();
    check(digestCount() == 0, "reset through dlsym");
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
}
