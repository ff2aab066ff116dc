// CPU reference of SteerGate (versions 1, 2 and 3) and SteerShift (versions 1 and 2). The math is steerOps.h; this file
// only loops over the tensors.
#include "steerOpsRef.h"

#include "steerOps.h"

#include <cstddef>
#include <vector>

namespace
{
using aligner::ops::Storage;
using aligner::ops::StorageTraits;

// The float32 dot product of one hidden row with the constants, in sequential order, and its sum of squares.
template <Storage S>
void rowDot(typename StorageTraits<S>::Element const* row, float const* weight, int64_t H, bool withSquares,
    float& dot, float& sumSquares)
{
    dot = 0.0f;
    sumSquares = 0.0f;
    for (int64_t h = 0; h < H; ++h)
    {
        float const x = StorageTraits<S>::load(row[h]);
        float const product = x * weight[h];
        dot += product;
        if (withSquares)
        {
            float const square = x * x;
            sumSquares += square;
        }
    }
}

template <Storage S>
void steerGate(void const* hidden, int64_t B, int64_t seq, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* direction, float bias, float* gate, float* score)
{
    auto const* base = static_cast<typename StorageTraits<S>::Element const*>(hidden);
    for (int64_t b = 0; b < B; ++b)
    {
        if (aligner::ops::scoreSkipped(gateIn[b], T, seq))
        {
            gate[b] = gateIn[b];
            score[b] = 0.0f;
            continue;
        }
        int64_t const last = aligner::ops::lastValidPosition(mask + b * T, T, seq);
        float dot = 0.0f;
        float unused = 0.0f;
        rowDot<S>(base + (b * seq + last) * H, direction, H, false, dot, unused);
        score[b] = dot + bias;
        gate[b] = aligner::ops::gateFromScore(gateIn[b], score[b]);
    }
}

// The sum of the pooled positions' terms of one row (``rowBase`` its [seq, H] block), summed from the last pooled
// position down, the order the kernel finds them in (versions 2 and 3).
template <Storage S>
float pooledTermSum(typename StorageTraits<S>::Element const* rowBase, int64_t const* positions, int64_t count,
    float const* weight, int64_t H, bool normalize)
{
    float sum = 0.0f;
    for (int64_t i = 0; i < count; ++i)
    {
        float dot = 0.0f;
        float sumSquares = 0.0f;
        rowDot<S>(rowBase + positions[i] * H, weight, H, normalize, dot, sumSquares);
        sum += aligner::ops::pooledTerm(dot, sumSquares, normalize);
    }
    return sum;
}

template <Storage S>
void steerGateV2(void const* hidden, int64_t B, int64_t seq, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* scoreIn, float const* weight, float bias, int64_t tokens, bool normalize,
    float* gate, float* score)
{
    auto const* base = static_cast<typename StorageTraits<S>::Element const*>(hidden);
    std::vector<int64_t> positions(static_cast<std::size_t>(tokens < seq ? tokens : seq));
    for (int64_t b = 0; b < B; ++b)
    {
        if (aligner::ops::scoreSkipped(gateIn[b], T, seq))
        {
            gate[b] = gateIn[b];
            score[b] = 0.0f;
            continue;
        }
        int64_t const count = aligner::ops::pooledPositions(mask + b * T, T, seq, tokens, positions.data());
        float const pooledSum = pooledTermSum<S>(base + b * seq * H, positions.data(), count, weight, H, normalize);
        score[b] = aligner::ops::gateV2Score(scoreIn[b], pooledSum, count, bias);
        gate[b] = aligner::ops::gateFromScore(gateIn[b], score[b]);
    }
}

// Version 3: version 2's pooled sum, then the max over the valid positions of this call (last_b when none).
template <Storage S>
void steerGateV3(void const* hidden, int64_t B, int64_t seq, int64_t H, int64_t const* mask, int64_t T,
    float const* gateIn, float const* scoreIn, float const* weight, float const* maxWeight, float bias, int64_t tokens,
    bool normalize, float* gate, float* score)
{
    auto const* base = static_cast<typename StorageTraits<S>::Element const*>(hidden);
    std::vector<int64_t> positions(static_cast<std::size_t>(tokens < seq ? tokens : seq));
    for (int64_t b = 0; b < B; ++b)
    {
        if (aligner::ops::scoreSkipped(gateIn[b], T, seq))
        {
            gate[b] = gateIn[b];
            score[b] = 0.0f;
            continue;
        }
        int64_t const* row = mask + b * T;
        int64_t const count = aligner::ops::pooledPositions(row, T, seq, tokens, positions.data());
        float const pooledSum = pooledTermSum<S>(base + b * seq * H, positions.data(), count, weight, H, normalize);
        bool const any = aligner::ops::hasValidPosition(row, T, seq);
        int64_t const fallback = aligner::ops::lastValidPosition(row, T, seq);
        float maxTerm = aligner::ops::maxStart();
        for (int64_t s = 0; s < seq; ++s)
        {
            if (any ? row[T - seq + s] != 1 : s != fallback)
            {
                continue;
            }
            float dot = 0.0f;
            float sumSquares = 0.0f;
            rowDot<S>(base + (b * seq + s) * H, maxWeight, H, normalize, dot, sumSquares);
            maxTerm = aligner::ops::maxWithNaN(maxTerm, aligner::ops::pooledTerm(dot, sumSquares, normalize));
        }
        score[b] = aligner::ops::gateV3Score(scoreIn[b], pooledSum, count, maxTerm, bias);
        gate[b] = aligner::ops::gateFromScore(gateIn[b], score[b]);
    }
}

template <Storage S>
void steerShift(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector, void* out)
{
    using Traits = StorageTraits<S>;
    auto const* in = static_cast<typename Traits::Element const*>(hidden);
    auto* dst = static_cast<typename Traits::Element*>(out);
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t i = b * seq * H; i < (b + 1) * seq * H; ++i)
        {
            dst[i] = Traits::store(aligner::ops::shiftValue(Traits::load(in[i]), gate[b], vector[i % H]));
        }
    }
}

// SteerShift version 2: two passes over each steered row (the sums, then the outputs), both reading the input, so
// out may equal hidden.
template <Storage S>
void steerShiftNorm(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector,
    void* out)
{
    using Traits = StorageTraits<S>;
    auto const* in = static_cast<typename Traits::Element const*>(hidden);
    auto* dst = static_cast<typename Traits::Element*>(out);
    for (int64_t b = 0; b < B; ++b)
    {
        float const g = gate[b];
        for (int64_t row = b * seq * H; row < (b + 1) * seq * H; row += H)
        {
            if (g == 0.0f)
            {
                for (int64_t h = 0; h < H; ++h)
                {
                    dst[row + h] = in[row + h]; // the element's bits, whatever they hold
                }
                continue;
            }
            float before = 0.0f;
            float after = 0.0f;
            for (int64_t h = 0; h < H; ++h)
            {
                float const x = Traits::load(in[row + h]);
                before = aligner::ops::addSquare(before, x);
                after = aligner::ops::addSquare(after, aligner::ops::shiftValue(x, g, vector[h]));
            }
            float const scale = aligner::ops::normShiftScale(before, after);
            for (int64_t h = 0; h < H; ++h)
            {
                float const y = aligner::ops::shiftValue(Traits::load(in[row + h]), g, vector[h]);
                dst[row + h] = Traits::store(aligner::ops::normShiftValue(y, scale));
            }
        }
    }
}

template <Storage S>
void toStorage(float const* src, int64_t n, void* dst)
{
    auto* out = static_cast<typename StorageTraits<S>::Element*>(dst);
    for (int64_t i = 0; i < n; ++i)
    {
        out[i] = StorageTraits<S>::store(src[i]);
    }
}

template <Storage S>
void fromStorage(void const* src, int64_t n, float* dst)
{
    auto const* in = static_cast<typename StorageTraits<S>::Element const*>(src);
    for (int64_t i = 0; i < n; ++i)
    {
        dst[i] = StorageTraits<S>::load(in[i]);
    }
}

bool badShape(int64_t B, int64_t S, int64_t H)
{
    return B < 0 || S < 1 || H < 1;
}

// The two SteerShift versions, as types, so that one entry point checks and dispatches them both.
struct AddShift
{
    template <Storage S>
    static void run(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector,
        void* out)
    {
        steerShift<S>(hidden, B, seq, H, gate, vector, out);
    }
};

struct NormShift
{
    template <Storage S>
    static void run(void const* hidden, int64_t B, int64_t seq, int64_t H, float const* gate, float const* vector,
        void* out)
    {
        steerShiftNorm<S>(hidden, B, seq, H, gate, vector, out);
    }
};

template <typename Shift>
int32_t refShift(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H, float const* gate,
    float const* vector, void* out)
{
    if (badShape(B, S, H))
    {
        return ALIGNER_REF_BAD_SHAPE;
    }
    if (!hidden || !gate || !vector || !out)
    {
        return ALIGNER_REF_NULL_POINTER;
    }
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: Shift::template run<Storage::kFP32>(hidden, B, S, H, gate, vector, out); break;
    case Storage::kFP16: Shift::template run<Storage::kFP16>(hidden, B, S, H, gate, vector, out); break;
    case Storage::kBF16: Shift::template run<Storage::kBF16>(hidden, B, S, H, gate, vector, out); break;
    default: return ALIGNER_REF_BAD_STORAGE;
    }
    return ALIGNER_REF_OK;
}
} // namespace

extern "C" int64_t aligner_ref_last_valid_position(int64_t const* mask_row, int64_t T, int64_t S)
{
    return aligner::ops::lastValidPosition(mask_row, T, S);
}

extern "C" int32_t aligner_ref_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction, float bias, float* gate,
    float* score)
{
    if (badShape(B, S, H) || T < S)
    {
        return ALIGNER_REF_BAD_SHAPE;
    }
    if (!hidden || !attention_mask || !gate_in || !direction || !gate || !score)
    {
        return ALIGNER_REF_NULL_POINTER;
    }
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: steerGate<Storage::kFP32>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score); break;
    case Storage::kFP16: steerGate<Storage::kFP16>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score); break;
    case Storage::kBF16: steerGate<Storage::kBF16>(hidden, B, S, H, attention_mask, T, gate_in, direction, bias, gate, score); break;
    default: return ALIGNER_REF_BAD_STORAGE;
    }
    return ALIGNER_REF_OK;
}

extern "C" int32_t aligner_ref_steer_gate_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float bias, int64_t tokens, int32_t normalize, float* gate, float* score)
{
    if (badShape(B, S, H) || T < S)
    {
        return ALIGNER_REF_BAD_SHAPE;
    }
    if (tokens < 1 || (normalize != 0 && normalize != 1))
    {
        return ALIGNER_REF_BAD_ATTRIBUTE;
    }
    if (!hidden || !attention_mask || !gate_in || !score_in || !weight || !gate || !score)
    {
        return ALIGNER_REF_NULL_POINTER;
    }
    bool const norm = normalize == 1;
    try
    {
        switch (static_cast<Storage>(storage))
        {
        case Storage::kFP32: steerGateV2<Storage::kFP32>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, bias, tokens, norm, gate, score); break;
        case Storage::kFP16: steerGateV2<Storage::kFP16>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, bias, tokens, norm, gate, score); break;
        case Storage::kBF16: steerGateV2<Storage::kBF16>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, bias, tokens, norm, gate, score); break;
        default: return ALIGNER_REF_BAD_STORAGE;
        }
    }
    catch (...)
    {
        return ALIGNER_REF_BAD_SHAPE; // the position buffer could not be allocated
    }
    return ALIGNER_REF_OK;
}

extern "C" int32_t aligner_ref_steer_gate_v3(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float const* max_weight, float bias, int64_t tokens, int32_t normalize, float* gate, float* score)
{
    if (badShape(B, S, H) || T < S)
    {
        return ALIGNER_REF_BAD_SHAPE;
    }
    if (tokens < 1 || (normalize != 0 && normalize != 1))
    {
        return ALIGNER_REF_BAD_ATTRIBUTE;
    }
    if (!hidden || !attention_mask || !gate_in || !score_in || !weight || !max_weight || !gate || !score)
    {
        return ALIGNER_REF_NULL_POINTER;
    }
    bool const norm = normalize == 1;
    try
    {
        switch (static_cast<Storage>(storage))
        {
        case Storage::kFP32: steerGateV3<Storage::kFP32>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, max_weight, bias, tokens, norm, gate, score); break;
        case Storage::kFP16: steerGateV3<Storage::kFP16>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, max_weight, bias, tokens, norm, gate, score); break;
        case Storage::kBF16: steerGateV3<Storage::kBF16>(hidden, B, S, H, attention_mask, T, gate_in, score_in, weight, max_weight, bias, tokens, norm, gate, score); break;
        default: return ALIGNER_REF_BAD_STORAGE;
        }
    }
    catch (...)
    {
        return ALIGNER_REF_BAD_SHAPE; // the position buffer could not be allocated
    }
    return ALIGNER_REF_OK;
}

extern "C" int32_t aligner_ref_steer_shift(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out)
{
    return refShift<AddShift>(storage, hidden, B, S, H, gate, vector, out);
}

extern "C" int32_t aligner_ref_steer_shift_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out)
{
    return refShift<NormShift>(storage, hidden, B, S, H, gate, vector, out);
}

extern "C" void aligner_ref_float_to_storage(int32_t storage, float const* src, int64_t n, void* dst)
{
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: toStorage<Storage::kFP32>(src, n, dst); break;
    case Storage::kFP16: toStorage<Storage::kFP16>(src, n, dst); break;
    case Storage::kBF16: toStorage<Storage::kBF16>(src, n, dst); break;
    }
}

extern "C" void aligner_ref_storage_to_float(int32_t storage, void const* src, int64_t n, float* dst)
{
    switch (static_cast<Storage>(storage))
    {
    case Storage::kFP32: fromStorage<Storage::kFP32>(src, n, dst); break;
    case Storage::kFP16: fromStorage<Storage::kFP16>(src, n, dst); break;
    case Storage::kBF16: fromStorage<Storage::kBF16>(src, n, dst); break;
    }
}
