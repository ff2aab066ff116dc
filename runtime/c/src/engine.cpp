// Loading a model: the export's signature (signature.h), the manifest, the ENGINE.json stamp, the plugin library, the
// engine and the integrity check of its steering constants (docs/contract.md "Integrity digests"), then the execution
// context and the device buffers.
#include "runtimeInternal.h"

#include "pluginDigestRegistry.h"
#include "sha256.h"
#include "signature.h"
#include "steerContract.h"

#include "NvInferVersion.h"

#include <dlfcn.h>

using namespace nvinfer1;

namespace aligner
{
namespace runtime
{
namespace
{
std::string directoryOf(std::string const& path)
{
    size_t const slash = path.find_last_of('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

std::string versionPrefix(std::string const& version, int parts)
{
    std::string out;
    int seen = 0;
    for (char c : version)
    {
        if (c == '.' && ++seen == parts)
        {
            break;
        }
        out.push_back(c);
    }
    return out;
}

std::string normaliseComputeCapability(std::string text)
{
    if (text.rfind("sm_", 0) == 0)
    {
        text = text.substr(3);
    }
    if (text.find('.') == std::string::npos && text.size() >= 2)
    {
        text = text.substr(0, text.size() - 1) + "." + text.substr(text.size() - 1);
    }
    return text;
}

// The plugin library's digest registry, reached through dlsym (pluginDigestRegistry.h).
struct DigestRegistry
{
    aligner_plugins_digest_reset_fn reset{nullptr};
    aligner_plugins_digest_count_fn count{nullptr};
    aligner_plugins_digest_at_fn at{nullptr};

    std::vector<PluginDigest> entries() const
    {
        std::vector<PluginDigest> out;
        int32_t const n = count();
        for (int32_t i = 0; i < n; ++i)
        {
            char const *name = nullptr, *op = nullptr, *version = nullptr, *hex = nullptr;
            if (at(i, &name, &op, &version, &hex) == 0)
            {
                out.push_back({name, op, version, hex});
            }
        }
        return out;
    }
};

DigestRegistry loadPlugins(aligner_model& model, std::string const& path)
{
    model.pluginHandle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (model.pluginHandle == nullptr)
    {
        char const* why = dlerror();
        throw Failure(ALIGNER_ERROR_PLUGIN, "cannot load plugin library " + path + ": " + (why ? why : "unknown"));
    }
    // The dynamic variant registers nothing on load; hand it to TensorRT's loader (see plugins/tensorrt/
    // inferalignerPlugins.cpp). The static variant registered itself when dlopen ran its constructors.
    if (dlsym(model.pluginHandle, "getCreators") != nullptr)
    {
        if (model.runtime->getPluginRegistry().loadLibrary(path.c_str()) == nullptr)
        {
            throw Failure(ALIGNER_ERROR_PLUGIN, "TensorRT could not load plugin library " + path + ": "
                + model.logger.lastError());
        }
    }
    IPluginRegistry& registry = model.runtime->getPluginRegistry();
    struct Wanted
    {
        char const* op;
        char const* version;
    };
    // SteerShift: the version of the manifest's shift_mode, so a library from before version 2 still runs "add".
    char const* const shiftVersion
        = model.manifest.shiftVersion == 2 ? contract::kSteerShiftVersion2 : contract::kSteerShiftVersion1;
    // SteerGate: versions 1 and 2 as always, and version 3 when the manifest's gate is the pooled gate (issue 18), so
    // a library from before version 3 still runs the exports of versions 1 and 2.
    char const* const gateVersion
        = model.manifest.gateVersion == 3 ? contract::kSteerGateVersion3 : contract::kSteerGateVersion2;
    for (Wanted const wanted : {Wanted{contract::kSteerGate, contract::kSteerGateVersion1},
             Wanted{contract::kSteerGate, contract::kSteerGateVersion2}, Wanted{contract::kSteerGate, gateVersion},
             Wanted{contract::kSteerShift, shiftVersion}})
    {
        if (registry.getCreator(wanted.op, wanted.version, contract::kPluginNamespace) == nullptr)
        {
            throw Failure(ALIGNER_ERROR_PLUGIN, "plugin library " + path + " does not provide "
                    + contract::kPluginNamespace + "::" + wanted.op + " version " + wanted.version);
        }
    }
    DigestRegistry digests;
    digests.reset = reinterpret_cast<aligner_plugins_digest_reset_fn>(
        dlsym(model.pluginHandle, "aligner_plugins_digest_reset"));
    digests.count = reinterpret_cast<aligner_plugins_digest_count_fn>(
        dlsym(model.pluginHandle, "aligner_plugins_digest_count"));
    digests.at = reinterpret_cast<aligner_plugins_digest_at_fn>(dlsym(model.pluginHandle, "aligner_plugins_digest_at"));
    if (digests.reset == nullptr || digests.count == nullptr || digests.at == nullptr)
    {
        throw Failure(ALIGNER_ERROR_PLUGIN, "plugin library " + path
                + " has no constants-digest registry (aligner_plugins_digest_*); rebuild it from this version");
    }
    return digests;
}

void checkStamp(aligner_model_options const& options, EngineStamp const& stamp, std::string const& manifestText,
    std::string const& manifestPath, std::string const& engineBlob)
{
    std::string const enginePath = options.engine_path;
    if (sha256Hex(manifestText.data(), manifestText.size()) != stamp.manifestSha256)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH,
            "engine " + enginePath + " was built from another export (manifest_sha256 of " + manifestPath + " differs)");
    }
    if (sha256Hex(engineBlob.data(), engineBlob.size()) != stamp.engineSha256)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + " is not the engine its "
                + contract::kEngineStampFile + " describes (engine_sha256 differs)");
    }
    int32_t const lib = getInferLibVersion();
    std::string const here = std::to_string(lib / 10000) + "." + std::to_string((lib / 100) % 100) + "."
        + std::to_string(lib % 100);
    if (versionPrefix(stamp.trtVersion, 3) != here)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + " was built with TensorRT " + stamp.trtVersion
                + "; this is TensorRT " + here + " (rebuild it here)");
    }
    cudaDeviceProp props{};
    cudaCheck(cudaGetDeviceProperties(&props, options.device), "cudaGetDeviceProperties");
    std::string const cc = std::to_string(props.major) + "." + std::to_string(props.minor);
    if (normaliseComputeCapability(stamp.computeCapability) != cc)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + " was built for compute capability "
                + stamp.computeCapability + "; this GPU is " + cc + " (rebuild it here)");
    }
}

// The registry is process-wide: one deserialisation at a time between its reset and its reading.
std::mutex gDeserialiseMutex;

void deserialiseChecked(aligner_model& model, DigestRegistry const& digests, std::string const& blob,
    std::string const& enginePath)
{
    std::vector<PluginDigest> created;
    {
        std::lock_guard<std::mutex> lock(gDeserialiseMutex);
        digests.reset();
        model.engine.reset(model.runtime->deserializeCudaEngine(blob.data(), blob.size()));
        created = digests.entries();
        digests.reset();
    }
    if (!model.engine)
    {
        throw Failure(ALIGNER_ERROR_TENSORRT, "TensorRT cannot deserialise " + enginePath + ": "
                + model.logger.lastError());
    }
    std::string const difference = compareConstantDigests(model.manifest, created);
    if (!difference.empty())
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + ": " + difference);
    }
}

bool hasTensor(ICudaEngine const& engine, std::string const& name)
{
    for (int32_t i = 0; i < engine.getNbIOTensors(); ++i)
    {
        if (name == engine.getIOTensorName(i))
        {
            return true;
        }
    }
    return false;
}

void describeEngine(aligner_model& model)
{
    ICudaEngine& engine = *model.engine;
    if (hasTensor(engine, "inputs_embeds"))
    {
        throw Failure(ALIGNER_ERROR_MISMATCH,
            "engine takes inputs_embeds: it is a vision-language export's language model, which the C API does not "
            "run (use aligner_runtime in Python)");
    }
    SteeringIo const& io = model.manifest.io;
    for (std::string const& name : {std::string("input_ids"), std::string("attention_mask"),
             std::string("position_ids"), io.gateIn, std::string("logits"), io.gate, io.score})
    {
        if (!hasTensor(engine, name))
        {
            throw Failure(ALIGNER_ERROR_MISMATCH, "engine has no tensor '" + name
                    + "' (the C API runs steered exports only)");
        }
    }
    while (hasTensor(engine, "past_key_values." + std::to_string(model.numLayers) + ".key"))
    {
        ++model.numLayers;
    }
    if (model.numLayers == 0)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine has no past_key_values.{i}.key inputs (export with a KV cache)");
    }
    Dims const kvShape = engine.getTensorShape("past_key_values.0.key");
    Dims const logitsShape = engine.getTensorShape("logits");
    if (kvShape.nbDims != 4 || kvShape.d[1] < 1 || kvShape.d[3] < 1 || logitsShape.nbDims != 3 || logitsShape.d[2] < 1)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine's past_key_values/logits shapes are not [B,heads,T,dim]/[B,S,V]");
    }
    model.kvHeads = static_cast<int32_t>(kvShape.d[1]);
    model.headDim = static_cast<int32_t>(kvShape.d[3]);
    model.vocab = static_cast<int32_t>(logitsShape.d[2]);
    model.kvType = engine.getTensorDataType("past_key_values.0.key");
    model.logitsType = engine.getTensorDataType("logits");

    Dims const idsMax = engine.getProfileShape("input_ids", 0, OptProfileSelector::kMAX);
    Dims const maskMax = engine.getProfileShape("attention_mask", 0, OptProfileSelector::kMAX);
    model.maxBatch = static_cast<int32_t>(idsMax.d[0]);
    model.maxPrompt = static_cast<int32_t>(idsMax.d[1]);
    model.maxContext = static_cast<int32_t>(maskMax.d[1]);
    // aligner-export build makes profile 0 for prefill (any S) and, when present, profile 1 for decode (S = 1).
    model.decodeProfile = engine.getNbOptimizationProfiles() > 1 ? 1 : 0;
}

void allocate(aligner_model& model)
{
    size_t const B = model.maxBatch, S = model.maxPrompt, T = model.maxContext;
    model.inputIds.allocate(B * S * 8, "input_ids");
    model.positionIds.allocate(B * S * 8, "position_ids");
    model.attentionMask.allocate(B * T * 8, "attention_mask");
    model.gateIn.allocate(B * 4, model.manifest.io.gateIn.c_str());
    model.gateOut.allocate(B * 4, model.manifest.io.gate.c_str());
    model.scoreOut.allocate(B * 4, model.manifest.io.score.c_str());
    model.logits.allocate(B * S * model.vocab * elementSize(model.logitsType), "logits");
    size_t const kvBytes = B * model.kvHeads * T * model.headDim * elementSize(model.kvType);
    for (auto& side : model.kv)
    {
        side = std::vector<DeviceBuffer>(2 * model.numLayers);
        for (auto& buffer : side)
        {
            buffer.allocate(kvBytes, "KV cache");
        }
    }
}
} // namespace

void createModel(aligner_model_options const& options, aligner_model& model)
{
    cudaCheck(cudaSetDevice(options.device), "cudaSetDevice");
    std::string const enginePath = options.engine_path;
    std::string const manifestPath = std::string(options.export_dir) + "/" + contract::kManifestFile;
    std::string const stampPath = directoryOf(enginePath) + "/" + contract::kEngineStampFile;
    std::string const manifestText = readFile(manifestPath, "export manifest");
    // The signature before anything else reads the export (issue 21): the bytes checked are the bytes parsed below.
    try
    {
        verifyExport(options.export_dir, manifestText, trustedKeysOption(options), expectSha256Option(options));
    }
    catch (SignatureError const& refused)
    {
        throw Failure(refused.status, refused.what());
    }
    std::string const stampText = readFile(stampPath, "engine stamp (written by aligner-export build)");
    EngineStamp stamp;
    try
    {
        model.manifest = parseManifest(manifestText, manifestPath);
        stamp = parseEngineStamp(stampText, stampPath);
    }
    catch (ManifestError const& refused)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, refused.what());
    }
    std::string const blob = readFile(enginePath, "engine");
    checkStamp(options, stamp, manifestText, manifestPath, blob);

    model.runtime.reset(createInferRuntime(model.logger));
    if (!model.runtime)
    {
        throw Failure(ALIGNER_ERROR_TENSORRT, "createInferRuntime failed: " + model.logger.lastError());
    }
    DigestRegistry const digests = loadPlugins(model, options.plugin_library_path);
    deserialiseChecked(model, digests, blob, enginePath);
    describeEngine(model);
    model.context.reset(model.engine->createExecutionContext());
    if (!model.context)
    {
        throw Failure(ALIGNER_ERROR_TENSORRT, "createExecutionContext failed: " + model.logger.lastError());
    }
    cudaCheck(cudaStreamCreate(&model.stream), "cudaStreamCreate");
    allocate(model);
}

} // namespace runtime
} // namespace aligner
