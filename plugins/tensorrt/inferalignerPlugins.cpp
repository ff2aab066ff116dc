// The one file that registers the inferaligner plugins with TensorRT. It is compiled twice (CMakeLists.txt):
//
// Five creators: SteerGate versions 1, 2 and 3, SteerShift versions 1 and 2 (docs/contract.md). Both libraries also export
// the constants-digest registry (pluginDigestRegistry.h), which lives in the plugin objects.
//
//  * libaligner_trt_plugins (ALIGNER_STATIC_REGISTRATION): registers the creators with the global plugin registry
//    when the library is loaded, so ctypes.CDLL(path), Polygraphy --plugins and dlopen() need nothing else.
//  * libaligner_trt_plugins_dynamic: exports getCreators() and setLoggerFinder() and registers nothing itself, for
//    IPluginRegistry::loadLibrary() and trtexec --dynamicPlugins. A library loaded that way that
//    also registered its creators at load time would register them twice, hence two thin targets over the same
//    objects.
#include "NvInferRuntime.h"
#include "SteerGate/steerGatePlugin.h"
#include "SteerShift/steerShiftPlugin.h"
#include "pluginUtils.h"

#include <atomic>

using namespace nvinfer1;

namespace
{
aligner::trt::SteerGatePluginCreator gSteerGateCreator{1};
aligner::trt::SteerGatePluginCreator gSteerGateV2Creator{2};
aligner::trt::SteerGatePluginCreator gSteerGateV3Creator{3};
aligner::trt::SteerShiftPluginCreator gSteerShiftCreator{1};
aligner::trt::SteerShiftPluginCreator gSteerShiftV2Creator{2};

#if !defined(ALIGNER_STATIC_REGISTRATION)
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
#endif

ILogger* logger() noexcept
{
#if defined(ALIGNER_STATIC_REGISTRATION)
    return getLogger();
#else
    ILoggerFinder* finder = gLoggerFinder.load();
    return finder != nullptr ? finder->findLogger() : nullptr;
#endif
}

#if defined(ALIGNER_STATIC_REGISTRATION)
struct StaticRegistration
{
    StaticRegistration()
    {
        IPluginRegistry* registry = getPluginRegistry();
        if (registry != nullptr)
        {
            registry->registerCreator(gSteerGateCreator, aligner::contract::kPluginNamespace);
            registry->registerCreator(gSteerGateV2Creator, aligner::contract::kPluginNamespace);
            registry->registerCreator(gSteerGateV3Creator, aligner::contract::kPluginNamespace);
            registry->registerCreator(gSteerShiftCreator, aligner::contract::kPluginNamespace);
            registry->registerCreator(gSteerShiftV2Creator, aligner::contract::kPluginNamespace);
        }
    }
};
StaticRegistration gStaticRegistration;
#endif
} // namespace

namespace aligner
{
namespace trt
{
void reportError(std::string const& message) noexcept
{
    ILogger* sink = logger();
    if (sink != nullptr)
    {
        sink->log(ILogger::Severity::kERROR, message.c_str());
    }
}
} // namespace trt
} // namespace aligner

#if !defined(ALIGNER_STATIC_REGISTRATION)
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder.store(finder);
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static IPluginCreatorInterface* const creators[]
        = {&gSteerGateCreator, &gSteerGateV2Creator, &gSteerGateV3Creator, &gSteerShiftCreator, &gSteerShiftV2Creator};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
#endif
