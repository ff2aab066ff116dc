// SteerGate kernel: one block per row; the block finds last_b from the attention mask, then reduces
// float32(hidden[b, last_b, :]) . direction over H (ARCHITECTURE.md §5).
#include "steerKernels.h"
#include "steerOps.h"

namespace
{
using aligner::ops::Storage;
using aligner::ops::StorageTraits;

constexpr int kBlock = 256;

__device__ float blockSum(float value, float* shared)
{
    for (int offset = 16; offset > 0; offset /= 2)
    {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    int const lane = threadIdx.x % 32;
    int const warp = threadIdx.x / 32;
    if (lane == 0)
    {
        shared[warp] = value;
    }
    __syncthreads();
    value = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.0f;
    if (warp == 0)
    {
        for (int offset = 16; offset > 0; offset /= 2)
        {
            value += __shfl_down_sync(0xffffffffu, value, offset);
        }
    }
    return value;
}

__device__ long long blockMax(long long value, long long* shared)
{
    for (int offset = 16; offset > 0; offset /= 2)
    {
        long long const other = __shfl_down_sync(0xffffffffu, value, offset);
        value = other > value ? other : value;
    }
    int const lane = threadIdx.x % 32;
    int const warp = threadIdx.x / 32;
    if (lane == 0)
    {
        shared[warp] = value;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
        {
            value = shared[w] > value ? shared[w] : value;
        }
        shared[0] = value;
    }
    __syncthreads();
    return shared[0];
}

template <Storage S>
__global__ void __launch_bounds__(kBlock) steerGateKernel(typename StorageTraits<S>::Element const* hidden,
    int64_t seq, int64_t H, int64_t const* mask, int64_t T, float const* gateIn, float const* direction,
    float const* bias, float* gate, float* score)
{
    __shared__ float sumShared[kBlock / 32];
    __shared__ long long maxShared[kBlock / 32];
    int64_t const b = blockIdx.x;

    // last valid t in [0, T): a parallel max over the mask row, then the mapping of steerOps.h.
    long long lastValid = -1;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
    {
        if (mask[b * T + t] == 1)
        {
            lastValid = t;
        }
    }
    lastValid = blockMax(lastValid, maxShared);
    int64_t last = seq - 1;
    if (lastValid >= 0)
    {
        last = lastValid - (T - seq);
        last = last < 0 ? 0 : (last > seq - 1 ? seq - 1 : last);
    }

    auto const* row = hidden + (b * seq + last) * H;
    float acc = 0.0f;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    {
        acc += StorageTraits<S>::load(row[h]) * direction[h];
    }
    acc = blockSum(acc, sumShared);
    if (threadIdx.x == 0)
    {
        float const s = acc + bias[0];
        score[b] = s;
        gate[b] = aligner::ops::gateFromScore(gateIn[b], s);
    }
}

template <Storage S>
cudaError_t launch(void const* hidden, int64_t B, int64_t seq, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* direction, float const* bias, float* gate, float* score, cudaStream_t stream)
{
    steerGateKernel<S><<<static_cast<unsigned>(B), kBlock, 0, stream>>>(
        static_cast<typename StorageTraits<S>::Element const*>(hidden), seq, H, mask, T, gateIn, direction, bias, gate,
        score);
    return cudaGetLastError();
}
} // namespace

extern "C" int32_t aligner_kernel_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction, float const* bias,
    float* gate, float* score, cudaStream_t stream)
{
    if (B == 0)
    {
        return cudaSuccess;
    }
    if (B < 0 || B > 0x7fffffff || S < 1 || H < 1 || T < S)
    {
        return cudaErrorInvalidValue;
    }
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: return launch<Storage::kFP32>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score, stream);
    case Storage::kFP16: return launch<Storage::kFP16>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score, stream);
    case Storage::kBF16: return launch<Storage::kBF16>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score, stream);
    }
    return cudaErrorInvalidValue;
}
