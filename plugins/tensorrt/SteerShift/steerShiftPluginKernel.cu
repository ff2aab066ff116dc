// SteerShift kernels. Version 1: out = hidden + gate[b] * vector[h] (docs/architecture.md §5). Memory-bound: one read
// and one write of hidden, 16-byte accesses when the rows allow it. In place, rows whose gate is 0 are skipped
// entirely. Version 2 ("norm", docs/contract.md "SteerShift version 2"): one block per position, which reduces the two
// sums of squares over H, then rescales; the per-element math is steerOps.h, shared with the CPU reference.
#include "steerKernels.h"
#include "steerOps.h"

#include <stdint.h>

namespace
{
using aligner::ops::Storage;
using aligner::ops::StorageTraits;

constexpr int kBlock = 256;

// Each thread handles one 16-byte chunk of kWidth elements; a chunk never crosses a row because H * sizeof(Element)
// is a multiple of 16 on this path.
template <Storage S>
__global__ void __launch_bounds__(kBlock) steerShiftVectorKernel(uint4 const* hidden, float const* gate,
    float const* vector, uint4* out, int64_t chunks, int64_t chunksPerBatch, int64_t H, bool inPlace)
{
    using Element = typename StorageTraits<S>::Element;
    constexpr int kWidth = sizeof(uint4) / sizeof(Element);
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float const g = __ldg(gate + c / chunksPerBatch);
        if (g == 0.0f && inPlace)
        {
            continue;
        }
        uint4 packed = hidden[c];
        if (g != 0.0f)
        {
            Element* elements = reinterpret_cast<Element*>(&packed);
            int64_t const h0 = (c * kWidth) % H;
#pragma unroll
            for (int i = 0; i < kWidth; ++i)
            {
                elements[i] = StorageTraits<S>::store(
                    aligner::ops::shiftValue(StorageTraits<S>::load(elements[i]), g, __ldg(vector + h0 + i)));
            }
        }
        out[c] = packed;
    }
}

template <Storage S>
__global__ void __launch_bounds__(kBlock) steerShiftScalarKernel(typename StorageTraits<S>::Element const* hidden,
    float const* gate, float const* vector, typename StorageTraits<S>::Element* out, int64_t total, int64_t perBatch,
    int64_t H, bool inPlace)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float const g = __ldg(gate + i / perBatch);
        if (g == 0.0f && inPlace)
        {
            continue;
        }
        out[i] = StorageTraits<S>::store(aligner::ops::shiftValue(StorageTraits<S>::load(hidden[i]), g, __ldg(vector + i % H)));
    }
}

constexpr int kWarps = kBlock / 32;

// Sum over the block, valid in thread 0. Ends with a barrier, so the next reduction may reuse `shared`.
__device__ float blockSum(float value, float* shared)
{
    for (int offset = 16; offset > 0; offset /= 2)
    {
        value = __fadd_rn(value, __shfl_down_sync(0xffffffffu, value, offset));
    }
    int const lane = threadIdx.x % 32;
    int const warp = threadIdx.x / 32;
    if (lane == 0)
    {
        shared[warp] = value;
    }
    __syncthreads();
    value = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
    {
        for (int offset = 16; offset > 0; offset /= 2)
        {
            value = __fadd_rn(value, __shfl_down_sync(0xffffffffu, value, offset));
        }
    }
    __syncthreads();
    return value;
}

// Version 2: block r (grid-stride) handles position r = b * S + s. The gate is the same for the whole block, so the
// gate-0 branch never splits it around a barrier.
template <Storage S>
__global__ void __launch_bounds__(kBlock) steerShiftNormKernel(typename StorageTraits<S>::Element const* hidden,
    float const* gate, float const* vector, typename StorageTraits<S>::Element* out, int64_t positions, int64_t seq,
    int64_t H, bool inPlace)
{
    using Traits = StorageTraits<S>;
    __shared__ float shared[kWarps];
    __shared__ float scaleShared;
    for (int64_t r = blockIdx.x; r < positions; r += gridDim.x)
    {
        float const g = __ldg(gate + r / seq);
        typename Traits::Element const* in = hidden + r * H;
        typename Traits::Element* dst = out + r * H;
        if (g == 0.0f)
        {
            if (!inPlace)
            {
                for (int64_t h = threadIdx.x; h < H; h += kBlock)
                {
                    dst[h] = in[h];
                }
            }
            continue;
        }
        float before = 0.0f;
        float after = 0.0f;
        for (int64_t h = threadIdx.x; h < H; h += kBlock)
        {
            float const x = Traits::load(in[h]);
            before = aligner::ops::addSquare(before, x);
            after = aligner::ops::addSquare(after, aligner::ops::shiftValue(x, g, __ldg(vector + h)));
        }
        before = blockSum(before, shared);
        after = blockSum(after, shared);
        if (threadIdx.x == 0)
        {
            scaleShared = aligner::ops::normShiftScale(before, after);
        }
        __syncthreads();
        float const scale = scaleShared;
        for (int64_t h = threadIdx.x; h < H; h += kBlock)
        {
            float const y = aligner::ops::shiftValue(Traits::load(in[h]), g, __ldg(vector + h));
            dst[h] = Traits::store(aligner::ops::normShiftValue(y, scale));
        }
        __syncthreads(); // every thread has read scaleShared before the next position writes it
    }
}

unsigned gridFor(int64_t work)
{
    // Enough blocks to fill any of the target GPUs several times over; the loops are grid-stride.
    int64_t const blocks = (work + kBlock - 1) / kBlock;
    return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <Storage S>
cudaError_t launch(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector,
    void* out, cudaStream_t stream)
{
    using Element = typename StorageTraits<S>::Element;
    bool const inPlace = hidden == out;
    int64_t const total = B * seq * H;
    bool const aligned = (reinterpret_cast<uintptr_t>(hidden) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0)
        && (reinterpret_cast<uintptr_t>(vector) % 16 == 0) && ((H * sizeof(Element)) % 16 == 0);
    if (aligned)
    {
        int64_t const width = sizeof(uint4) / sizeof(Element);
        int64_t const chunks = total / width;
        steerShiftVectorKernel<S><<<gridFor(chunks), kBlock, 0, stream>>>(static_cast<uint4 const*>(hidden), gate,
            vector, static_cast<uint4*>(out), chunks, seq * H / width, H, inPlace);
    }
    else
    {
        steerShiftScalarKernel<S><<<gridFor(total), kBlock, 0, stream>>>(static_cast<Element const*>(hidden), gate,
            vector, static_cast<Element*>(out), total, seq * H, H, inPlace);
    }
    return cudaGetLastError();
}
template <Storage S>
cudaError_t launchNorm(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector,
    void* out, cudaStream_t stream)
{
    using Element = typename StorageTraits<S>::Element;
    int64_t const positions = B * seq;
    unsigned const blocks = static_cast<unsigned>(positions < 65535 ? positions : 65535);
    steerShiftNormKernel<S><<<blocks, kBlock, 0, stream>>>(static_cast<Element const*>(hidden), gate, vector,
        static_cast<Element*>(out), positions, seq, H, hidden == out);
    return cudaGetLastError();
}

// The two SteerShift versions, as types, so that one entry point checks and dispatches them both.
struct AddLaunch
{
    template <Storage S>
    static cudaError_t run(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate,
        float const* vector, void* out, cudaStream_t stream)
    {
        return launch<S>(hidden, B, seq, H, gate, vector, out, stream);
    }
};

struct NormLaunch
{
    template <Storage S>
    static cudaError_t run(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate,
        float const* vector, void* out, cudaStream_t stream)
    {
        return launchNorm<S>(hidden, B, seq, H, gate, vector, out, stream);
    }
};

template <typename Launch>
int32_t kernelShift(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H, float const* gate,
    float const* vector, void* out, cudaStream_t stream)
{
    if (B == 0)
    {
        return cudaSuccess;
    }
    if (B < 0 || S < 1 || H < 1)
    {
        return cudaErrorInvalidValue;
    }
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: return Launch::template run<Storage::kFP32>(hidden, B, S, H, gate, vector, out, stream);
    case Storage::kFP16: return Launch::template run<Storage::kFP16>(hidden, B, S, H, gate, vector, out, stream);
    case Storage::kBF16: return Launch::template run<Storage::kBF16>(hidden, B, S, H, gate, vector, out, stream);
    }
    return cudaErrorInvalidValue;
}
} // namespace

extern "C" int32_t aligner_kernel_steer_shift_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out, cudaStream_t stream)
{
    return kernelShift<NormLaunch>(storage, hidden, B, S, H, gate, vector, out, stream);
}

extern "C" int32_t aligner_kernel_steer_shift(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out, cudaStream_t stream)
{
    return kernelShift<AddLaunch>(storage, hidden, B, S, H, gate, vector, out, stream);
}
