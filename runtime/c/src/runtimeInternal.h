// What the C runtime's sources share: the error type that crosses the C boundary as (status, message), the model and
// result objects behind the opaque handles, and small CUDA/file helpers. The parts: engine.cpp (engine, stamp and
// integrity checks on load), generate.cpp (the generation loop), capi.cpp (the C ABI), manifest.cpp and protocol.cpp
// (host-only rules, tested by ctest runtime_helpers).
#pragma once

#include "aligner_runtime.h"
#include "manifest.h"

#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace aligner
{
namespace runtime
{

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

inline void cudaCheck(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw Failure(ALIGNER_ERROR_CUDA, std::string(what) + ": " + cudaGetErrorString(status));
    }
}

// The options of API version 2, the smallest aligner_model_create accepts (its struct_size).
constexpr size_t kModelOptionsV2Size = offsetof(aligner_model_options, device) + sizeof(int32_t);

// Whether the caller's aligner_model_options (struct_size) holds the field that ends `end` bytes in: the fields added
// after version 2 read as NULL from an older program's smaller struct.
inline bool hasModelOption(aligner_model_options const& options, size_t end)
{
    return options.struct_size >= end;
}

inline char const* trustedKeysOption(aligner_model_options const& options)
{
    return hasModelOption(options, offsetof(aligner_model_options, trusted_keys) + sizeof(char const*))
        ? options.trusted_keys
        : nullptr;
}

inline char const* expectSha256Option(aligner_model_options const& options)
{
    return hasModelOption(options, offsetof(aligner_model_options, expect_sha256) + sizeof(char const*))
        ? options.expect_sha256
        : nullptr;
}

inline std::string readFile(std::string const& path, char const* what)
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

// Keeps TensorRT's last error so a refused deserialisation can say why.
class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
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

inline size_t elementSize(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT32: return 4;
    default: throw Failure(ALIGNER_ERROR_MISMATCH, "engine uses an I/O data type the C API does not handle");
    }
}

} // namespace runtime
} // namespace aligner

struct aligner_result
{
    std::vector<std::vector<int32_t>> tokens;
    std::vector<float> gate;
    std::vector<float> score;
    std::vector<uint32_t> flags; // ALIGNER_FLAG_*
};

struct aligner_model
{
    aligner::runtime::Logger logger;
    void* pluginHandle{nullptr};
    std::unique_ptr<nvinfer1::IRuntime> runtime;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    cudaStream_t stream{nullptr};

    aligner::runtime::Manifest manifest; // steering I/O names, gate layers, steer layers, two-pass rule
    int32_t numLayers{0};
    int32_t vocab{0};
    int32_t kvHeads{0};
    int32_t headDim{0};
    int32_t maxBatch{0};
    int32_t maxPrompt{0};  // input_ids' sequence dimension, profile 0
    int32_t maxContext{0}; // attention_mask's total length
    int32_t decodeProfile{0};
    int32_t currentProfile{-1};
    nvinfer1::DataType kvType{nvinfer1::DataType::kFLOAT};
    nvinfer1::DataType logitsType{nvinfer1::DataType::kFLOAT};

    aligner::runtime::DeviceBuffer inputIds, attentionMask, positionIds, gateIn, gateOut, scoreOut, logits;
    // Two buffers per key/value tensor: present of one step becomes past of the next.
    std::vector<aligner::runtime::DeviceBuffer> kv[2];
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

namespace aligner
{
namespace runtime
{
// engine.cpp: every check of aligner_model_create, then the execution context and the buffers.
void createModel(aligner_model_options const& options, aligner_model& model);

// generate.cpp: the runtime protocol over a left-padded batch of token ids.
void generate(aligner_model& model, int32_t const* const* prompts, int32_t const* lengths, int32_t batch,
    aligner_generate_options const& options, aligner_result& result);
} // namespace runtime
} // namespace aligner
