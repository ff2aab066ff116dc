// SteerGate kernel, versions 1, 2 and 3 (docs/contract.md): one block per row. The block finds the pooled positions by
// scanning the call's mask from the end, a block-wide chunk at a time (a ballot ranks the valid positions of a chunk),
// and stops once it has K of them; for each pooled position it reduces the dot product with the weight over H, and,
// when normalising, the squared norm, with block reductions. A row with no valid position in the call falls back to
// version 1's last_b (a parallel max over the whole mask row). Version 1 is this kernel with K = 1, no normalisation
// and no score_in. The per-row math (the term, the division by the count, the decision) is steerOps.h, shared with
// the CPU reference. On a call with a past, a row whose gate_in >= 0 is not scored (gate = gate_in, score = 0;
// docs/contract.md "The score at decode"). Version 3 adds the max over every valid position of the call of the
// position's term with max_weight: each warp takes every kWarps-th position (a warp reduction over H per position),
// keeps a NaN-propagating running max (steerOps.h maxWithNaN), and thread 0 combines the warps' maxima.
#include "steerKernels.h"
#include "steerOps.h"

namespace
{
using aligner::ops::Storage;
using aligner::ops::StorageTraits;

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// Sum over the block, valid in thread 0. Ends with a barrier, so the next reduction may reuse `shared`.
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
    value = threadIdx.x < kWarps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
    {
        for (int offset = 16; offset > 0; offset /= 2)
        {
            value += __shfl_down_sync(0xffffffffu, value, offset);
        }
    }
    __syncthreads();
    return value;
}

// Maximum over the block, returned to every thread.
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
    long long result = shared[0];
    for (int w = 1; w < kWarps; ++w)
    {
        result = shared[w] > result ? shared[w] : result;
    }
    __syncthreads();
    return result;
}

// d_s of one pooled row (steerOps.h pooledTerm), valid in thread 0.
template <Storage S>
__device__ float pooledRowTerm(typename StorageTraits<S>::Element const* row, int64_t H, float const* weight,
    bool normalize, float* sumShared, float* squareShared)
{
    float dot = 0.0f;
    float sumSquares = 0.0f;
    for (int64_t h = threadIdx.x; h < H; h += kBlock)
    {
        float const x = StorageTraits<S>::load(row[h]);
        dot += x * weight[h];
        if (normalize)
        {
            sumSquares += x * x;
        }
    }
    dot = blockSum(dot, sumShared);
    if (normalize)
    {
        sumSquares = blockSum(sumSquares, squareShared);
    }
    return aligner::ops::pooledTerm(dot, sumSquares, normalize);
}

// Sum over the warp, returned to every lane.
__device__ float warpSum(float value)
{
    for (int offset = 16; offset > 0; offset /= 2)
    {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    return value;
}

// Version 3's e_s of one row (steerOps.h pooledTerm with max_weight), computed by one warp, returned to every lane.
template <Storage S>
__device__ float warpRowTerm(typename StorageTraits<S>::Element const* row, int64_t H, float const* weight,
    bool normalize)
{
    float dot = 0.0f;
    float sumSquares = 0.0f;
    for (int64_t h = threadIdx.x % 32; h < H; h += 32)
    {
        float const x = StorageTraits<S>::load(row[h]);
        dot += x * weight[h];
        if (normalize)
        {
            sumSquares += x * x;
        }
    }
    dot = warpSum(dot);
    if (normalize)
    {
        sumSquares = warpSum(sumSquares);
    }
    return aligner::ops::pooledTerm(dot, sumSquares, normalize);
}

// scoreIn == nullptr: version 1 (the launcher passes tokens = 1, so the pooled sum is d of last_b). maxWeight ==
// nullptr: versions 1 and 2; else version 3's max term is added.
template <Storage S>
__global__ void __launch_bounds__(kBlock) steerGateKernel(typename StorageTraits<S>::Element const* hidden,
    int64_t seq, int64_t H, int64_t const* mask, int64_t T, float const* gateIn, float const* scoreIn,
    float const* weight, float const* maxWeight, float bias, int64_t tokens, bool normalize, float* gate,
    float* score)
{
    __shared__ float warpMaxima[kWarps];
    __shared__ float sumShared[kWarps];
    __shared__ float squareShared[kWarps];
    __shared__ int warpCounts[kWarps];
    __shared__ long long chunkPositions[kBlock];
    __shared__ long long maxShared[kWarps];
    int64_t const b = blockIdx.x;
    // The score at decode (steerOps.h scoreSkipped): the whole block leaves together, before any barrier.
    if (aligner::ops::scoreSkipped(gateIn[b], T, seq))
    {
        if (threadIdx.x == 0)
        {
            gate[b] = gateIn[b];
            score[b] = 0.0f;
        }
        return;
    }
    int64_t const* maskRow = mask + b * T;
    int64_t const* callMask = maskRow + (T - seq); // mask[b, T - S + s] for s in [0, S)
    auto const* rows = hidden + b * seq * H;
    int const lane = threadIdx.x % 32;
    int const warp = threadIdx.x / 32;

    float pooledSum = 0.0f; // thread 0 holds the value
    int64_t found = 0;      // the same in every thread
    for (int64_t chunkEnd = seq; chunkEnd > 0 && found < tokens; chunkEnd -= kBlock)
    {
        // Thread i looks at s = chunkEnd - 1 - i, so thread order is descending s and a valid position's rank among
        // the chunk's valid positions is the number of valid positions held by lower threads.
        int64_t const s = chunkEnd - 1 - threadIdx.x;
        bool const valid = s >= 0 && callMask[s] == 1;
        unsigned const ballot = __ballot_sync(0xffffffffu, valid);
        if (lane == 0)
        {
            warpCounts[warp] = __popc(ballot);
        }
        __syncthreads();
        int rank = __popc(ballot & ((1u << lane) - 1u));
        int chunkCount = 0;
        for (int w = 0; w < kWarps; ++w)
        {
            rank += w < warp ? warpCounts[w] : 0;
            chunkCount += warpCounts[w];
        }
        int64_t const wanted = tokens - found;
        int64_t const take = chunkCount < wanted ? chunkCount : wanted;
        if (valid && rank < take)
        {
            chunkPositions[rank] = s;
        }
        __syncthreads();
        for (int64_t i = 0; i < take; ++i)
        {
            pooledSum += pooledRowTerm<S>(rows + chunkPositions[i] * H, H, weight, normalize, sumShared, squareShared);
        }
        found += take;
        __syncthreads(); // warpCounts and chunkPositions are rewritten by the next chunk
    }
    bool const anyValid = found > 0; // K >= 1: the scan found a valid position iff the call has one
    int64_t last = seq - 1;
    if (found == 0)
    {
        // No valid position in this call: version 1's last_b (steerOps.h lastValidPosition).
        long long lastValid = -1;
        for (int64_t t = threadIdx.x; t < T; t += kBlock)
        {
            if (maskRow[t] == 1)
            {
                lastValid = t;
            }
        }
        lastValid = blockMax(lastValid, maxShared);
        if (lastValid >= 0)
        {
            last = lastValid - (T - seq);
            last = last < 0 ? 0 : (last > seq - 1 ? seq - 1 : last);
        }
        pooledSum = pooledRowTerm<S>(rows + last * H, H, weight, normalize, sumShared, squareShared);
        found = 1;
    }
    float maxTerm = aligner::ops::maxStart(); // version 3: thread 0 holds the value
    if (maxWeight != nullptr)
    {
        // The max's positions: every valid position of the call, or last_b alone when there is none.
        float warpMax = aligner::ops::maxStart();
        for (int64_t s = warp; s < seq; s += kWarps)
        {
            if (anyValid ? callMask[s] == 1 : s == last)
            {
                warpMax = aligner::ops::maxWithNaN(warpMax, warpRowTerm<S>(rows + s * H, H, maxWeight, normalize));
            }
        }
        if (lane == 0)
        {
            warpMaxima[warp] = warpMax;
        }
        __syncthreads();
        if (threadIdx.x == 0)
        {
            for (int w = 0; w < kWarps; ++w)
            {
                maxTerm = aligner::ops::maxWithNaN(maxTerm, warpMaxima[w]);
            }
        }
    }
    if (threadIdx.x == 0)
    {
        float const s = maxWeight != nullptr
            ? aligner::ops::gateV3Score(scoreIn[b], pooledSum, found, maxTerm, bias)
            : (scoreIn != nullptr ? aligner::ops::gateV2Score(scoreIn[b], pooledSum, found, bias)
                                  : __fadd_rn(pooledSum, bias));
        score[b] = s;
        gate[b] = aligner::ops::gateFromScore(gateIn[b], s);
    }
}

template <Storage S>
cudaError_t launch(void const* hidden, int64_t B, int64_t seq, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* scoreIn, float const* weight, float const* maxWeight, float bias,
    int64_t tokens, bool normalize, float* gate, float* score, cudaStream_t stream)
{
    steerGateKernel<S><<<static_cast<unsigned>(B), kBlock, 0, stream>>>(
        static_cast<typename StorageTraits<S>::Element const*>(hidden), seq, H, mask, T, gateIn, scoreIn, weight,
        maxWeight, bias, tokens, normalize, gate, score);
    return cudaGetLastError();
}

int32_t dispatch(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* scoreIn, float const* weight, float const* maxWeight, float bias,
    int64_t tokens, int32_t normalize, float* gate, float* score, cudaStream_t stream)
{
    if (B == 0)
    {
        return cudaSuccess;
    }
    if (B < 0 || B > 0x7fffffff || S < 1 || H < 1 || T < S || tokens < 1 || (normalize != 0 && normalize != 1))
    {
        return cudaErrorInvalidValue;
    }
    bool const norm = normalize == 1;
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: return launch<Storage::kFP32>(hidden, B, S, H, mask, T, gateIn, scoreIn, weight, maxWeight, bias, tokens, norm, gate, score, stream);
    case Storage::kFP16: return launch<Storage::kFP16>(hidden, B, S, H, mask, T, gateIn, scoreIn, weight, maxWeight, bias, tokens, norm, gate, score, stream);
    case Storage::kBF16: return launch<Storage::kBF16>(hidden, B, S, H, mask, T, gateIn, scoreIn, weight, maxWeight, bias, tokens, norm, gate, score, stream);
    }
    return cudaErrorInvalidValue;
}
} // namespace

extern "C" int32_t aligner_kernel_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction, float bias, float* gate,
    float* score, cudaStream_t stream)
{
    return dispatch(storage, hidden, B, S, H, attention_mask, T, gate_in, nullptr, direction, nullptr, bias, 1, 0,
        gate, score, stream);
}

extern "C" int32_t aligner_kernel_steer_gate_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float bias, int64_t tokens, int32_t normalize, float* gate, float* score, cudaStream_t stream)
{
    if (score_in == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    return dispatch(storage, hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, nullptr, bias, tokens,
        normalize, gate, score, stream);
}

extern "C" int32_t aligner_kernel_steer_gate_v3(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float const* max_weight, float bias, int64_t tokens, int32_t normalize, float* gate, float* score,
    cudaStream_t stream)
{
    if (score_in == nullptr || max_weight == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    return dispatch(storage, hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, max_weight, bias, tokens,
        normalize, gate, score, stream);
}
