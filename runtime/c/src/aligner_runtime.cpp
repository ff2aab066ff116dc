// The C API of include/aligner_runtime.h over the TensorRT runtime. The KV cache stays on the device; only the last
// position's logits come back to the host for sampling. See ARCHITECTURE.md §5 for the graph interface and the
// runtime protocol this follows.
#include "aligner_runtime.h"

#include "jsonScan.h"
#include "sha256.h"

#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace nvinfer1;
using aligner::jsonInt;
using aligner::jsonIntArray;
using aligner::jsonString;
using aligner::sha256Hex;

namespace
{
thread_local std::string gLastError;

// An error crossing the C boundary as (status, one-line message).
struct Failure : std::runtime_error
{
    Failure(aligner_status s, std::string const& message)
        : std::runtime_error(message)
        , status(s)
    {
    }
    aligner_status status;
};

template <typename F>
aligner_status guarded(F&& body)
{
    try
    {
        body();
        gLastError.clear();
        return ALIGNER_OK;
    }
    catch (Failure const& failure)
    {
        gLastError = failure.what();
        return failure.status;
    }
    catch (std::bad_alloc const&)
    {
        gLastError = "out of host memory";
        return ALIGNER_ERROR_INTERNAL;
    }
    catch (std::exception const& e)
    {
        gLastError = std::string("internal error: ") + e.what();
        return ALIGNER_ERROR_INTERNAL;
    }
    catch (...)
    {
        gLastError = "internal error";
        return ALIGNER_ERROR_INTERNAL;
    }
}

void cudaCheck(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw Failure(ALIGNER_ERROR_CUDA, std::string(what) + ": " + cudaGetErrorString(status));
    }
}

std::string readFile(std::string const& path, char const* what)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        throw Failure(ALIGNER_ERROR_FILE, std::string(what) + " not found or unreadable: " + path);
    }
    std::ostringstream content;
    content << in.rdbuf();
    return content.str();
}

std::string directoryOf(std::string const& path)
{
    size_t const slash = path.find_last_of('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

// Keeps TensorRT's last error so a refused deserialisation can say why.
class Logger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR && msg != nullptr)
        {
            std::lock_guard<std::mutex> lock(mMutex);
            mLastError = msg;
        }
    }
    std::string lastError()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mLastError;
    }

private:
    std::mutex mMutex;
    std::string mLastError;
};

struct DeviceBuffer
{
    void* data{nullptr};
    size_t bytes{0};
    DeviceBuffer() = default;
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    ~DeviceBuffer()
    {
        if (data != nullptr)
        {
            cudaFree(data);
        }
    }
    void allocate(size_t size, char const* what)
    {
        size = std::max<size_t>(size, 256);
        cudaCheck(cudaMalloc(&data, size), what);
        bytes = size;
    }
};

size_t elementSize(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return 4;
    case DataType::kHALF: return 2;
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    case DataType::kINT32: return 4;
    default: throw Failure(ALIGNER_ERROR_MISMATCH, "engine uses an I/O data type the C API does not handle");
    }
}

float toFloat(void const* base, size_t index, DataType type)
{
    if (type == DataType::kFLOAT)
    {
        return static_cast<float const*>(base)[index];
    }
    uint16_t const bits = static_cast<uint16_t const*>(base)[index];
    if (type == DataType::kBF16)
    {
        uint32_t const u = static_cast<uint32_t>(bits) << 16;
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
    }
    // float16
    uint32_t const sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu;
    uint32_t const mantissa = bits & 0x3ffu;
    uint32_t u;
    if (exponent == 0x1f)
    {
        u = sign | 0x7f800000u | (mantissa << 13);
    }
    else if (exponent == 0)
    {
        float const magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    else
    {
        u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
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
} // namespace

struct aligner_result
{
    std::vector<std::vector<int32_t>> tokens;
    std::vector<float> gate;
    std::vector<float> score;
};

struct aligner_model
{
    Logger logger;
    void* pluginHandle{nullptr};
    std::unique_ptr<IRuntime> runtime;
    std::unique_ptr<ICudaEngine> engine;
    std::unique_ptr<IExecutionContext> context;
    cudaStream_t stream{nullptr};

    int32_t numLayers{0};
    int32_t gateLayer{-1};
    std::vector<int64_t> steerLayers;
    bool twoPass{false};
    int32_t vocab{0};
    int32_t kvHeads{0};
    int32_t headDim{0};
    int32_t maxBatch{0};
    int32_t maxPrompt{0};   // input_ids' sequence dimension, profile 0
    int32_t maxContext{0};  // attention_mask's total length
    int32_t decodeProfile{0};
    int32_t currentProfile{-1};
    DataType kvType{DataType::kFLOAT};
    DataType logitsType{DataType::kFLOAT};

    DeviceBuffer inputIds, attentionMask, positionIds, gateIn, gateOut, scoreOut, logits;
    // Two buffers per key/value tensor: present of one step becomes past of the next.
    std::vector<DeviceBuffer> kv[2];
    int32_t kvCurrent{0};

    ~aligner_model()
    {
        context.reset();
        engine.reset();
        runtime.reset();
        if (stream != nullptr)
        {
            cudaStreamDestroy(stream);
        }
        // The plugin library stays loaded: TensorRT's registry may still refer to its creators.
    }
};

namespace
{
void loadPlugins(aligner_model& model, std::string const& path)
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
    for (char const* name : {"SteerGate", "SteerShift"})
    {
        if (registry.getCreator(name, "1", "inferaligner") == nullptr)
        {
            throw Failure(ALIGNER_ERROR_PLUGIN, "plugin library " + path + " does not provide inferaligner::" + name);
        }
    }
}

void checkStamp(aligner_model_options const& options, aligner_model& model)
{
    std::string const enginePath = options.engine_path;
    std::string const stampPath = directoryOf(enginePath) + "/ENGINE.json";
    std::string const stamp = readFile(stampPath, "engine stamp (written by aligner-export build)");
    std::string const manifestPath = std::string(options.export_dir) + "/inferaligner.json";
    std::string const manifest = readFile(manifestPath, "export manifest");

    std::string stampedManifest, stampedTrt, stampedCc;
    if (!jsonString(stamp, "manifest_sha256", stampedManifest) || !jsonString(stamp, "trt_version", stampedTrt)
        || !jsonString(stamp, "compute_capability", stampedCc))
    {
        throw Failure(ALIGNER_ERROR_FILE, stampPath + " lacks manifest_sha256, trt_version or compute_capability");
    }
    if (sha256Hex(manifest.data(), manifest.size()) != stampedManifest)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH,
            "engine " + enginePath + " was built from another export (manifest_sha256 of " + manifestPath + " differs)");
    }
    int32_t const lib = getInferLibVersion();
    std::string const here = std::to_string(lib / 10000) + "." + std::to_string((lib / 100) % 100) + "."
        + std::to_string(lib % 100);
    if (versionPrefix(stampedTrt, 3) != here)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + " was built with TensorRT " + stampedTrt
                + "; this is TensorRT " + here + " (rebuild it here)");
    }
    cudaDeviceProp props{};
    cudaCheck(cudaGetDeviceProperties(&props, options.device), "cudaGetDeviceProperties");
    std::string const cc = std::to_string(props.major) + "." + std::to_string(props.minor);
    if (normaliseComputeCapability(stampedCc) != cc)
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, "engine " + enginePath + " was built for compute capability " + stampedCc
                + "; this GPU is " + cc + " (rebuild it here)");
    }
    int64_t gateLayer = -1;
    if (!jsonInt(manifest, "gate_layer", gateLayer) || !jsonIntArray(manifest, "steer_layers", model.steerLayers))
    {
        throw Failure(ALIGNER_ERROR_MISMATCH, manifestPath + " has no gate_layer/steer_layers: not a steered export");
    }
    model.gateLayer = static_cast<int32_t>(gateLayer);
    model.twoPass = std::any_of(model.steerLayers.begin(), model.steerLayers.end(),
        [&](int64_t layer) { return layer < gateLayer; });
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
    for (char const* name : {"input_ids", "attention_mask", "position_ids", "steer_gate_in", "logits", "steer_gate",
             "steer_score"})
    {
        if (!hasTensor(engine, name))
        {
            throw Failure(ALIGNER_ERROR_MISMATCH, std::string("engine has no tensor '") + name
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
    model.gateIn.allocate(B * 4, "steer_gate_in");
    model.gateOut.allocate(B * 4, "steer_gate");
    model.scoreOut.allocate(B * 4, "steer_score");
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

// Runs one forward: batch rows, seq new positions over past cached ones. Inputs are already on the device.
void forward(aligner_model& model, int32_t batch, int32_t seq, int32_t past)
{
    IExecutionContext& ctx = *model.context;
    int32_t const profile = (seq == 1) ? model.decodeProfile : 0;
    if (profile != model.currentProfile)
    {
        if (!ctx.setOptimizationProfileAsync(profile, model.stream))
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, "cannot select optimization profile " + std::to_string(profile));
        }
        model.currentProfile = profile;
    }
    auto setInput = [&](char const* name, Dims dims, void* data) {
        if (!ctx.setInputShape(name, dims) || !ctx.setTensorAddress(name, data))
        {
            throw Failure(ALIGNER_ERROR_CAPACITY, std::string("shape of '") + name + "' outside the engine's profile: "
                    + model.logger.lastError());
        }
    };
    auto setOutput = [&](char const* name, void* data) {
        if (!ctx.setTensorAddress(name, data))
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, std::string("cannot bind '") + name + "'");
        }
    };
    setInput("input_ids", Dims2{batch, seq}, model.inputIds.data);
    setInput("position_ids", Dims2{batch, seq}, model.positionIds.data);
    setInput("attention_mask", Dims2{batch, past + seq}, model.attentionMask.data);
    setInput("steer_gate_in", Dims{1, {batch}}, model.gateIn.data);
    auto& pastSide = model.kv[model.kvCurrent];
    auto& presentSide = model.kv[1 - model.kvCurrent];
    for (int32_t layer = 0; layer < model.numLayers; ++layer)
    {
        for (int32_t kind = 0; kind < 2; ++kind)
        {
            std::string const suffix = std::to_string(layer) + (kind == 0 ? ".key" : ".value");
            setInput(("past_key_values." + suffix).c_str(), Dims4{batch, model.kvHeads, past, model.headDim},
                pastSide[2 * layer + kind].data);
            setOutput(("present." + suffix).c_str(), presentSide[2 * layer + kind].data);
        }
    }
    setOutput("logits", model.logits.data);
    setOutput("steer_gate", model.gateOut.data);
    setOutput("steer_score", model.scoreOut.data);
    if (!ctx.enqueueV3(model.stream))
    {
        throw Failure(ALIGNER_ERROR_TENSORRT, "enqueueV3 failed: " + model.logger.lastError());
    }
    cudaCheck(cudaStreamSynchronize(model.stream), "forward");
    model.kvCurrent = 1 - model.kvCurrent;
}

void upload(DeviceBuffer& buffer, void const* host, size_t bytes, cudaStream_t stream)
{
    cudaCheck(cudaMemcpyAsync(buffer.data, host, bytes, cudaMemcpyHostToDevice, stream), "upload");
}

// Logits of the last position of every row (rows are left-padded, so it is position seq - 1).
void lastLogits(aligner_model& model, int32_t batch, int32_t seq, std::vector<float>& out)
{
    size_t const elem = elementSize(model.logitsType);
    size_t const rowBytes = static_cast<size_t>(model.vocab) * elem;
    std::vector<unsigned char> raw(batch * rowBytes);
    cudaCheck(cudaMemcpy2DAsync(raw.data(), rowBytes,
                  static_cast<unsigned char*>(model.logits.data) + static_cast<size_t>(seq - 1) * rowBytes,
                  static_cast<size_t>(seq) * rowBytes, rowBytes, batch, cudaMemcpyDeviceToHost, model.stream),
        "logits");
    cudaCheck(cudaStreamSynchronize(model.stream), "logits");
    out.resize(static_cast<size_t>(batch) * model.vocab);
    for (size_t i = 0; i < out.size(); ++i)
    {
        out[i] = toFloat(raw.data(), i, model.logitsType);
    }
}

int32_t pickToken(float const* logits, int32_t vocab, aligner_generate_options const& options, std::mt19937_64& rng)
{
    if (!options.do_sample)
    {
        return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
    }
    std::vector<std::pair<float, int32_t>> ranked(vocab);
    float const top = *std::max_element(logits, logits + vocab);
    double total = 0.0;
    for (int32_t i = 0; i < vocab; ++i)
    {
        float const p = std::exp((logits[i] - top) / options.temperature);
        ranked[i] = {p, i};
        total += p;
    }
    std::sort(ranked.begin(), ranked.end(), [](auto const& a, auto const& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    // Nucleus: the smallest prefix whose probability mass reaches top_p.
    double mass = 0.0;
    size_t keep = 0;
    while (keep < ranked.size() && (keep == 0 || mass < options.top_p * total))
    {
        mass += ranked[keep++].first;
    }
    double draw = std::uniform_real_distribution<double>(0.0, mass)(rng);
    for (size_t i = 0; i < keep; ++i)
    {
        draw -= ranked[i].first;
        if (draw <= 0.0)
        {
            return ranked[i].second;
        }
    }
    return ranked[keep - 1].second;
}

void generate(aligner_model& model, int32_t const* const* prompts, int32_t const* lengths, int32_t batch,
    aligner_generate_options const& options, aligner_result& result)
{
    int32_t longest = 0;
    for (int32_t b = 0; b < batch; ++b)
    {
        if (prompts[b] == nullptr || lengths[b] < 1)
        {
            throw Failure(ALIGNER_ERROR_INVALID_ARGUMENT, "prompt " + std::to_string(b) + " is empty or NULL");
        }
        longest = std::max(longest, lengths[b]);
    }
    if (batch > model.maxBatch || longest > model.maxPrompt || longest + options.max_new_tokens > model.maxContext)
    {
        throw Failure(ALIGNER_ERROR_CAPACITY, "batch " + std::to_string(batch) + ", prompt " + std::to_string(longest)
                + " + " + std::to_string(options.max_new_tokens) + " new tokens exceed the engine's profiles (batch "
                + std::to_string(model.maxBatch) + ", prompt " + std::to_string(model.maxPrompt) + ", context "
                + std::to_string(model.maxContext) + ")");
    }
    // Left padding: every row's last prompt token sits at position longest - 1, so decode steps stay aligned.
    int32_t const S = longest;
    std::vector<int64_t> ids(static_cast<size_t>(batch) * S, 0), positions(ids.size(), 1);
    std::vector<int64_t> mask(static_cast<size_t>(batch) * (S + options.max_new_tokens), 0);
    int32_t const T = S + options.max_new_tokens;
    std::vector<int64_t> validCount(batch);
    for (int32_t b = 0; b < batch; ++b)
    {
        int32_t const pad = S - lengths[b];
        for (int32_t i = 0; i < lengths[b]; ++i)
        {
            ids[b * S + pad + i] = prompts[b][i];
            positions[b * S + pad + i] = i; // HF convention: cumsum(mask) - 1, padding at 1
        }
        validCount[b] = lengths[b];
    }
    auto uploadMask = [&](int32_t total) {
        std::vector<int64_t> packed(static_cast<size_t>(batch) * total);
        for (int32_t b = 0; b < batch; ++b)
        {
            std::copy_n(&mask[static_cast<size_t>(b) * T], total, &packed[static_cast<size_t>(b) * total]);
        }
        upload(model.attentionMask, packed.data(), packed.size() * 8, model.stream);
    };
    for (int32_t b = 0; b < batch; ++b)
    {
        for (int32_t t = S - lengths[b]; t < S; ++t)
        {
            mask[static_cast<size_t>(b) * T + t] = 1;
        }
    }

    // Prefill with steer_gate_in = -1: SteerGate decides from the prompt (§5 step 1).
    std::vector<float> gateIn(batch, -1.0f);
    auto prefill = [&]() {
        model.kvCurrent = 0;
        upload(model.inputIds, ids.data(), ids.size() * 8, model.stream);
        upload(model.positionIds, positions.data(), positions.size() * 8, model.stream);
        uploadMask(S);
        upload(model.gateIn, gateIn.data(), gateIn.size() * 4, model.stream);
        forward(model, batch, S, 0);
    };
    prefill();
    result.gate.assign(batch, 0.0f);
    result.score.assign(batch, 0.0f);
    cudaCheck(cudaMemcpy(result.gate.data(), model.gateOut.data, batch * 4, cudaMemcpyDeviceToHost), "steer_gate");
    cudaCheck(cudaMemcpy(result.score.data(), model.scoreOut.data, batch * 4, cudaMemcpyDeviceToHost), "steer_score");
    // §5 step 2: a steered layer below the gate layer saw gate 0 in the scoring pass; run the steered pass. The batch
    // runs again with the decided gates, so rows whose gate is 0 compute what they computed before.
    bool const anyGate = std::any_of(result.gate.begin(), result.gate.end(), [](float g) { return g > 0.0f; });
    if (model.twoPass && anyGate)
    {
        gateIn = result.gate;
        prefill();
    }
    gateIn = result.gate; // §5 step 3: the gate is fed back on every decode step

    std::vector<bool> done(batch, false);
    result.tokens.assign(batch, {});
    std::vector<std::mt19937_64> rngs;
    for (int32_t b = 0; b < batch; ++b)
    {
        rngs.emplace_back(options.seed + static_cast<uint64_t>(b) * 0x9e3779b97f4a7c15ull);
    }
    std::vector<float> logits;
    std::vector<int64_t> stepIds(batch), stepPositions(batch);
    int32_t seq = S;
    for (int32_t step = 0; step < options.max_new_tokens; ++step)
    {
        lastLogits(model, batch, seq, logits);
        bool allDone = true;
        for (int32_t b = 0; b < batch; ++b)
        {
            int32_t token = 0;
            if (!done[b])
            {
                token = pickToken(&logits[static_cast<size_t>(b) * model.vocab], model.vocab, options, rngs[b]);
                result.tokens[b].push_back(token);
                bool const stop = std::find(options.stop_token_ids, options.stop_token_ids + options.num_stop_token_ids,
                                      token) != options.stop_token_ids + options.num_stop_token_ids;
                bool const cancelled = options.on_token != nullptr && options.on_token(options.user_data, b, token) != 0;
                done[b] = stop || cancelled;
            }
            stepIds[b] = token;
            stepPositions[b] = validCount[b]++;
            mask[static_cast<size_t>(b) * T + S + step] = 1;
            allDone = allDone && done[b];
        }
        if (allDone || step + 1 == options.max_new_tokens)
        {
            break;
        }
        upload(model.inputIds, stepIds.data(), batch * 8, model.stream);
        upload(model.positionIds, stepPositions.data(), batch * 8, model.stream);
        uploadMask(S + step + 1);
        upload(model.gateIn, gateIn.data(), batch * 4, model.stream);
        forward(model, batch, 1, S + step);
        seq = 1;
    }
}

aligner_status invalid(char const* message)
{
    gLastError = message;
    return ALIGNER_ERROR_INVALID_ARGUMENT;
}
} // namespace

extern "C" {

const char* aligner_last_error(void)
{
    return gLastError.c_str();
}

const char* aligner_status_name(aligner_status status)
{
    switch (status)
    {
    case ALIGNER_OK: return "ALIGNER_OK";
    case ALIGNER_ERROR_INVALID_ARGUMENT: return "ALIGNER_ERROR_INVALID_ARGUMENT";
    case ALIGNER_ERROR_FILE: return "ALIGNER_ERROR_FILE";
    case ALIGNER_ERROR_MISMATCH: return "ALIGNER_ERROR_MISMATCH";
    case ALIGNER_ERROR_PLUGIN: return "ALIGNER_ERROR_PLUGIN";
    case ALIGNER_ERROR_TENSORRT: return "ALIGNER_ERROR_TENSORRT";
    case ALIGNER_ERROR_CUDA: return "ALIGNER_ERROR_CUDA";
    case ALIGNER_ERROR_CAPACITY: return "ALIGNER_ERROR_CAPACITY";
    case ALIGNER_ERROR_INTERNAL: return "ALIGNER_ERROR_INTERNAL";
    }
    return "ALIGNER_ERROR_UNKNOWN";
}

const char* aligner_version(void)
{
    return ALIGNER_RUNTIME_VERSION;
}

aligner_status aligner_model_options_init(aligner_model_options* options)
{
    if (options == nullptr)
    {
        return invalid("aligner_model_options_init: options is NULL");
    }
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    return ALIGNER_OK;
}

aligner_status aligner_model_create(const aligner_model_options* options, aligner_model** model)
{
    if (options == nullptr || model == nullptr)
    {
        return invalid("aligner_model_create: options and model must not be NULL");
    }
    *model = nullptr;
    if (options->struct_size < sizeof(aligner_model_options) || options->engine_path == nullptr
        || options->plugin_library_path == nullptr || options->export_dir == nullptr)
    {
        return invalid("aligner_model_create: set struct_size (aligner_model_options_init), engine_path, "
                       "plugin_library_path and export_dir");
    }
    return guarded([&] {
        auto created = std::make_unique<aligner_model>();
        cudaCheck(cudaSetDevice(options->device), "cudaSetDevice");
        checkStamp(*options, *created);
        created->runtime.reset(createInferRuntime(created->logger));
        if (!created->runtime)
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, "createInferRuntime failed: " + created->logger.lastError());
        }
        loadPlugins(*created, options->plugin_library_path);
        std::string const blob = readFile(options->engine_path, "engine");
        created->engine.reset(created->runtime->deserializeCudaEngine(blob.data(), blob.size()));
        if (!created->engine)
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, std::string("TensorRT cannot deserialise ") + options->engine_path
                    + ": " + created->logger.lastError());
        }
        describeEngine(*created);
        created->context.reset(created->engine->createExecutionContext());
        if (!created->context)
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, "createExecutionContext failed: " + created->logger.lastError());
        }
        cudaCheck(cudaStreamCreate(&created->stream), "cudaStreamCreate");
        allocate(*created);
        *model = created.release();
    });
}

aligner_status aligner_model_destroy(aligner_model* model)
{
    delete model;
    return ALIGNER_OK;
}

aligner_status aligner_model_get_info(const aligner_model* model, aligner_model_info* info)
{
    if (model == nullptr || info == nullptr)
    {
        return invalid("aligner_model_get_info: model and info must not be NULL");
    }
    info->num_layers = model->numLayers;
    info->gate_layer = model->gateLayer;
    info->num_steer_layers = static_cast<int32_t>(model->steerLayers.size());
    info->vocab_size = model->vocab;
    info->max_batch = model->maxBatch;
    info->max_sequence = model->maxContext;
    info->two_pass_prefill = model->twoPass ? 1 : 0;
    return ALIGNER_OK;
}

aligner_status aligner_generate_options_init(aligner_generate_options* options)
{
    if (options == nullptr)
    {
        return invalid("aligner_generate_options_init: options is NULL");
    }
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->max_new_tokens = 128;
    options->temperature = 1.0f;
    options->top_p = 1.0f;
    return ALIGNER_OK;
}

aligner_status aligner_generate(aligner_model* model, const int32_t* const* prompts, const int32_t* prompt_lengths,
    int32_t batch, const aligner_generate_options* options, aligner_result** result)
{
    if (model == nullptr || prompts == nullptr || prompt_lengths == nullptr || options == nullptr || result == nullptr)
    {
        return invalid("aligner_generate: model, prompts, prompt_lengths, options and result must not be NULL");
    }
    *result = nullptr;
    if (options->struct_size < sizeof(aligner_generate_options) || batch < 1 || options->max_new_tokens < 1
        || (options->num_stop_token_ids > 0 && options->stop_token_ids == nullptr) || options->num_stop_token_ids < 0)
    {
        return invalid("aligner_generate: need batch >= 1, max_new_tokens >= 1, initialised options and stop tokens");
    }
    if (options->do_sample
        && !(options->temperature > 0.0f && options->top_p > 0.0f && options->top_p <= 1.0f))
    {
        return invalid("aligner_generate: sampling needs temperature > 0 and top_p in (0, 1]");
    }
    return guarded([&] {
        auto out = std::make_unique<aligner_result>();
        generate(*model, prompts, prompt_lengths, batch, *options, *out);
        *result = out.release();
    });
}

aligner_status aligner_result_destroy(aligner_result* result)
{
    delete result;
    return ALIGNER_OK;
}

aligner_status aligner_result_num_sequences(const aligner_result* result, int32_t* count)
{
    if (result == nullptr || count == nullptr)
    {
        return invalid("aligner_result_num_sequences: result and count must not be NULL");
    }
    *count = static_cast<int32_t>(result->tokens.size());
    return ALIGNER_OK;
}

aligner_status aligner_result_tokens(const aligner_result* result, int32_t sequence, const int32_t** tokens, int32_t* length)
{
    if (result == nullptr || tokens == nullptr || length == nullptr || sequence < 0
        || sequence >= static_cast<int32_t>(result->tokens.size()))
    {
        return invalid("aligner_result_tokens: NULL argument or sequence out of range");
    }
    *tokens = result->tokens[sequence].data();
    *length = static_cast<int32_t>(result->tokens[sequence].size());
    return ALIGNER_OK;
}

aligner_status aligner_result_gate(const aligner_result* result, int32_t sequence, float* gate, float* score)
{
    if (result == nullptr || gate == nullptr || score == nullptr || sequence < 0
        || sequence >= static_cast<int32_t>(result->gate.size()))
    {
        return invalid("aligner_result_gate: NULL argument or sequence out of range");
    }
    *gate = result->gate[sequence];
    *score = result->score[sequence];
    return ALIGNER_OK;
}

} // extern "C"
