// The operator math of docs/architecture.md §5 and §5.1 in the precise form of docs/contract.md, shared by the CPU
// reference, the CUDA kernels, the TensorRT plugins and the C runtime (the fp16/bf16 conversions). One header, usable
// from host and device code; storage may be fp32, fp16 or bf16, accumulation is always float32.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ALIGNER_HD __host__ __device__ __forceinline__
#else
#define ALIGNER_HD inline
#endif

namespace aligner
{
namespace ops
{

// Storage types of the hidden tensor. The values are part of the CPU reference's C ABI (steerOpsRef.h).
enum class Storage : int32_t
{
    kFP32 = 0,
    kFP16 = 1,
    kBF16 = 2,
};

ALIGNER_HD uint32_t floatBits(float f)
{
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    union
    {
        float f;
        uint32_t u;
    } v{f};
    return v.u;
#endif
}

ALIGNER_HD float bitsFloat(uint32_t u)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    union
    {
        uint32_t u;
        float f;
    } v{u};
    return v.f;
#endif
}

// IEEE binary16 <-> float32, round to nearest even. The device path uses the hardware conversions, which round the
// same way, so host and device agree bit for bit.
ALIGNER_HD float halfToFloat(uint16_t h)
{
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu)
    {
        return bitsFloat(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0)
    {
        if (mantissa == 0)
        {
            return bitsFloat(sign);
        }
        // Subnormal: value = mantissa * 2^-24, exact in float32.
        float const magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return bitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

ALIGNER_HD uint16_t floatToHalf(float f)
{
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    uint32_t const u = floatBits(f);
    uint16_t const sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    uint32_t const absBits = u & 0x7fffffffu;
    if (absBits >= 0x7f800000u)
    {
        // Inf stays Inf; NaN stays a quiet NaN.
        return static_cast<uint16_t>(sign | 0x7c00u | (absBits > 0x7f800000u ? 0x200u : 0u));
    }
    if (absBits >= 0x477ff000u)
    {
        // >= 65520 rounds to infinity.
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    if (absBits < 0x38800000u)
    {
        // Result is subnormal or zero: round |f| * 2^24 to the nearest integer, ties to even. The product is exact and
        // below 2^10, so adding and subtracting 2^23 rounds it with the FPU's own ties-to-even rule.
        float const scaled = bitsFloat(absBits) * 16777216.0f;
        float const rounded = (scaled + 8388608.0f) - 8388608.0f;
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded));
    }
    uint32_t const exponent = (absBits >> 23) - 112u;
    uint32_t mantissa = absBits & 0x7fffffu;
    uint32_t result = (exponent << 10) | (mantissa >> 13);
    uint32_t const remainder = mantissa & 0x1fffu;
    if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u)))
    {
        ++result; // may carry into the exponent, which is the correct rounding
    }
    return static_cast<uint16_t>(sign | result);
#endif
}

ALIGNER_HD float bf16ToFloat(uint16_t b)
{
    return bitsFloat(static_cast<uint32_t>(b) << 16);
}

ALIGNER_HD uint16_t floatToBf16(float f)
{
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    uint32_t const u = floatBits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
    {
        return static_cast<uint16_t>((u >> 16) | 0x40u); // quiet NaN
    }
    uint32_t const bias = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>((u + bias) >> 16);
#endif
}

// Load one element of storage type S as float32, and store a float32 back with round to nearest even.
template <Storage S>
struct StorageTraits;

template <>
struct StorageTraits<Storage::kFP32>
{
    using Element = float;
    static ALIGNER_HD float load(Element v)
    {
        return v;
    }
    static ALIGNER_HD Element store(float v)
    {
        return v;
    }
};

template <>
struct StorageTraits<Storage::kFP16>
{
    using Element = uint16_t;
    static ALIGNER_HD float load(Element v)
    {
        return halfToFloat(v);
    }
    static ALIGNER_HD Element store(float v)
    {
        return floatToHalf(v);
    }
};

template <>
struct StorageTraits<Storage::kBF16>
{
    using Element = uint16_t;
    static ALIGNER_HD float load(Element v)
    {
        return bf16ToFloat(v);
    }
    static ALIGNER_HD Element store(float v)
    {
        return floatToBf16(v);
    }
};

// SteerGate's last_b (§5): the position, within this call's S positions, of the last token of the row whose mask is
// 1. The mask covers T = past + S positions; the call's positions are the last S of them, so t* maps to t* - (T - S).
// Works for left and right padding alike. A row with no valid token (or whose last valid token lies in the past)
// is clamped into [0, S-1]; a row with no 1 at all uses S-1.
ALIGNER_HD int64_t lastValidPosition(int64_t const* maskRow, int64_t T, int64_t S)
{
    int64_t last = -1;
    for (int64_t t = T - 1; t >= 0; --t)
    {
        if (maskRow[t] == 1)
        {
            last = t;
            break;
        }
    }
    if (last < 0)
    {
        return S - 1;
    }
    int64_t position = last - (T - S);
    if (position < 0)
    {
        position = 0;
    }
    if (position > S - 1)
    {
        position = S - 1;
    }
    return position;
}

// True for a finite float (neither NaN nor an infinity), from the bits so that no fast-math flag can fold it away.
ALIGNER_HD bool isFinite(float f)
{
    return (floatBits(f) & 0x7f800000u) != 0x7f800000u;
}

// The decision (docs/contract.md, amended by issue 14): gate[b] = gate_in[b] if gate_in[b] >= 0, else 1 if
// score[b] > 0 or score[b] is NaN or +-inf, else 0. Flipped bytes in the constants must never turn steering off. A NaN
// gate_in is not >= 0, so it falls through to the score.
ALIGNER_HD float gateFromScore(float gateIn, float score)
{
    if (gateIn >= 0.0f)
    {
        return gateIn;
    }
    return (score > 0.0f || !isFinite(score)) ? 1.0f : 0.0f;
}

// The score at decode (docs/contract.md "The score at decode", issue 20, both versions): on a call with a past
// (T > S) a row whose gate_in >= 0 is not scored: gate[b] = gate_in[b] and score[b] = 0. A prefill (T == S) scores
// every row, forced or not; a NaN gate_in is not >= 0, so its row is scored.
ALIGNER_HD bool scoreSkipped(float gateIn, int64_t T, int64_t S)
{
    return T > S && gateIn >= 0.0f;
}

// --- SteerGate version 2 (docs/contract.md "SteerGate version 2", docs/architecture.md §5.1) ----------------------

// n(x) = x / max(||x||, kNormEpsilon) when normalising.
constexpr float kNormEpsilon = 1e-6f;

// The version-2 pooled positions of one row: the (at most) `tokens` largest s in [0, S) whose
// mask[T - S + s] is 1, written to positions[] from the largest down; returns how many. When the call has no valid
// position, version 1's last_b alone (so the count is never 0). positions must hold min(tokens, S) entries.
ALIGNER_HD int64_t pooledPositions(int64_t const* maskRow, int64_t T, int64_t S, int64_t tokens, int64_t* positions)
{
    int64_t count = 0;
    for (int64_t s = S - 1; s >= 0 && count < tokens; --s)
    {
        if (maskRow[T - S + s] == 1)
        {
            positions[count++] = s;
        }
    }
    if (count == 0)
    {
        positions[count++] = lastValidPosition(maskRow, T, S);
    }
    return count;
}

// d_s from the position's dot product with the weight and its sum of squares (both float32): d_s itself, or
// d_s / max(||x||, 1e-6) when normalising. A NaN norm stays NaN (and so steers), it is not replaced by the epsilon.
ALIGNER_HD float pooledTerm(float dot, float sumSquares, bool normalize)
{
    if (!normalize)
    {
        return dot;
    }
#if defined(__CUDA_ARCH__)
    float norm = __fsqrt_rn(sumSquares);
    norm = norm < kNormEpsilon ? kNormEpsilon : norm;
    return __fdiv_rn(dot, norm);
#else
    float norm = __builtin_sqrtf(sumSquares);
    norm = norm < kNormEpsilon ? kNormEpsilon : norm;
    return dot / norm;
#endif
}

// score[b] = (score_in[b] + f[b]) + bias with f[b] = (sum of d_s over the pooled positions) / count: a division, so
// that K = 1 gives d_s exactly.
ALIGNER_HD float gateV2Score(float scoreIn, float pooledSum, int64_t count, float bias)
{
#if defined(__CUDA_ARCH__)
    float const feature = __fdiv_rn(pooledSum, static_cast<float>(count));
    return __fadd_rn(__fadd_rn(scoreIn, feature), bias);
#else
    float const feature = pooledSum / static_cast<float>(count);
    return (scoreIn + feature) + bias;
#endif
}

// --- SteerGate version 3, the pooled gate (docs/contract.md "SteerGate version 3", issue 18) ------------------------
//
// Version 2's score plus m[b], the max over every valid position s of this call (mask[T - S + s] == 1; version 1's
// last_b alone when there is none) of e_s, the pooledTerm of the position's dot product with max_weight. A NaN e_s
// among those positions makes m[b] NaN (and so the score, which steers). Positions outside them never enter.

// True when this call holds a valid position of the row (mask[T - S + s] == 1 for some s in [0, S)).
ALIGNER_HD bool hasValidPosition(int64_t const* maskRow, int64_t T, int64_t S)
{
    for (int64_t s = 0; s < S; ++s)
    {
        if (maskRow[T - S + s] == 1)
        {
            return true;
        }
    }
    return false;
}

// True for a NaN, from the bits (as isFinite) so that no fast-math flag can fold it away.
ALIGNER_HD bool isNaN(float f)
{
    return (floatBits(f) & 0x7fffffffu) > 0x7f800000u;
}

// The NaN-propagating max of a running max (start: -inf) and one more term; exact, so its order does not matter.
ALIGNER_HD float maxWithNaN(float runningMax, float term)
{
    if (isNaN(runningMax) || isNaN(term))
    {
        return bitsFloat(0x7fc00000u); // quiet NaN
    }
    return term > runningMax ? term : runningMax;
}

// The start of the running max: -inf.
ALIGNER_HD float maxStart()
{
    return bitsFloat(0xff800000u);
}

// score[b] = ((score_in[b] + f[b]) + m[b]) + bias, f[b] as in gateV2Score.
ALIGNER_HD float gateV3Score(float scoreIn, float pooledSum, int64_t count, float maxTerm, float bias)
{
#if defined(__CUDA_ARCH__)
    float const feature = __fdiv_rn(pooledSum, static_cast<float>(count));
    return __fadd_rn(__fadd_rn(__fadd_rn(scoreIn, feature), maxTerm), bias);
#else
    float const feature = pooledSum / static_cast<float>(count);
    return ((scoreIn + feature) + maxTerm) + bias;
#endif
}

// out = hidden + gate * vector in float32 (§5). A zero gate returns hidden unchanged, so harmless rows come back bit
// for bit (including the sign of zeros). The product and the sum are rounded separately on the device as on the
// host (no fused multiply-add), so the kernels match the CPU reference exactly.
ALIGNER_HD float shiftValue(float hidden, float gate, float vector)
{
    if (gate == 0.0f)
    {
        return hidden;
    }
#if defined(__CUDA_ARCH__)
    return __fadd_rn(hidden, __fmul_rn(gate, vector));
#else
    float const product = gate * vector;
    return hidden + product;
#endif
}

// --- SteerShift version 2, "norm" (docs/contract.md "SteerShift version 2", issue 17) -------------------------------
//
// Per position: y_h = shiftValue(h_h, gate, vector_h) (rounded as version 1), the float32 sums of squares
// sum_h h_h*h_h and sum_h y_h*y_h (each product rounded, then added in order), scale = ||h|| / max(||y||, 1e-6), and
// out_h = y_h * scale. A zero gate returns the row unchanged (the caller copies it, or skips it in place).

// ||h|| / max(||y||, kNormEpsilon) from the two sums of squares. A NaN sum stays NaN: it is not floored.
ALIGNER_HD float normShiftScale(float squaresBefore, float squaresAfter)
{
#if defined(__CUDA_ARCH__)
    float const before = __fsqrt_rn(squaresBefore);
    float after = __fsqrt_rn(squaresAfter);
    after = after < kNormEpsilon ? kNormEpsilon : after;
    return __fdiv_rn(before, after);
#else
    float const before = __builtin_sqrtf(squaresBefore);
    float after = __builtin_sqrtf(squaresAfter);
    after = after < kNormEpsilon ? kNormEpsilon : after;
    return before / after;
#endif
}

// One square added to a running sum, product and sum rounded separately (no fused multiply-add) on both sides.
ALIGNER_HD float addSquare(float sum, float x)
{
#if defined(__CUDA_ARCH__)
    return __fadd_rn(sum, __fmul_rn(x, x));
#else
    float const square = x * x;
    return sum + square;
#endif
}

// out_h = y_h * scale.
ALIGNER_HD float normShiftValue(float shifted, float scale)
{
#if defined(__CUDA_ARCH__)
    return __fmul_rn(shifted, scale);
#else
    return shifted * scale;
#endif
}

} // namespace ops
} // namespace aligner
