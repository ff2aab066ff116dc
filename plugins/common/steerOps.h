// The operator math of ARCHITECTURE.md §5, shared by the CPU reference, the CUDA kernels and the TensorRT plugins.
// One header, usable from host and device code; storage may be fp32, fp16 or bf16, accumulation is always float32.
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

// gate[b] = gate_in[b] if gate_in[b] >= 0, else 1 if score[b] > 0, else 0 (§5).
ALIGNER_HD float gateFromScore(float gateIn, float score)
{
    if (gateIn >= 0.0f)
    {
        return gateIn;
    }
    return score > 0.0f ? 1.0f : 0.0f;
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

} // namespace ops
} // namespace aligner
