// ctest: the CPU reference (plugins/common) against naive loops written independently here: float64 accumulation,
// the compiler's own _Float16 for binary16 rounding, and a nearest-value search for bfloat16 rounding.
#include "steerOpsRef.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace
{
int gFailures = 0;

void check(bool ok, char const* what, double got = 0.0, double want = 0.0)
{
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL %s (got %.9g, want %.9g)\n", what, got, want);
    }
}

float bitsToFloat(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// bfloat16 by definition: of the two bf16 values around x, the nearer one; on a tie the one with an even last bit.
float nearestBf16(float x)
{
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    float const down = bitsToFloat(u & 0xffff0000u);
    float const up = bitsToFloat((u & 0xffff0000u) + 0x10000u);
    double const dDown = std::fabs(static_cast<double>(x) - down);
    // Past the largest bf16 the next value up is infinity, which IEEE rounding treats as 2^128.
    double const upValue = std::isinf(up) ? std::copysign(std::ldexp(1.0, 128), up) : static_cast<double>(up);
    double const dUp = std::fabs(upValue - x);
    if (dDown < dUp)
    {
        return down;
    }
    if (dUp < dDown)
    {
        return up;
    }
    return ((u >> 16) & 1u) ? up : down;
}

void testConversions()
{
    std::mt19937 rng(7);
    std::uniform_int_distribution<uint32_t> bits;
    std::vector<float> values;
    for (int i = 0; i < 200000; ++i)
    {
        float const f = bitsToFloat(bits(rng));
        if (std::isfinite(f))
        {
            values.push_back(f);
        }
    }
    // Half-way and subnormal cases that random bits rarely hit.
    for (float f : {65504.0f, 65519.9f, 65520.0f, 6.0e-8f, 2.98023224e-8f, 8.940697e-8f, 6.097555e-5f, 1.0009765625f,
             1.00048828125f, 1.00146484375f, -0.0f, 0.0f})
    {
        values.push_back(f);
        values.push_back(-f);
    }
    std::vector<uint16_t> half(values.size()), bf16(values.size());
    std::vector<float> halfBack(values.size()), bf16Back(values.size());
    aligner_ref_float_to_storage(ALIGNER_REF_FP16, values.data(), values.size(), half.data());
    aligner_ref_storage_to_float(ALIGNER_REF_FP16, half.data(), half.size(), halfBack.data());
    aligner_ref_float_to_storage(ALIGNER_REF_BF16, values.data(), values.size(), bf16.data());
    aligner_ref_storage_to_float(ALIGNER_REF_BF16, bf16.data(), bf16.size(), bf16Back.data());
    int halfBad = 0, bf16Bad = 0;
    for (size_t i = 0; i < values.size(); ++i)
    {
        float const wantHalf = static_cast<float>(static_cast<_Float16>(values[i]));
        if (std::memcmp(&wantHalf, &halfBack[i], sizeof(float)) != 0 && !(std::isnan(wantHalf) && std::isnan(halfBack[i])))
        {
            if (++halfBad < 5)
            {
                check(false, "fp16 rounding", halfBack[i], wantHalf);
            }
        }
        float const wantBf16 = nearestBf16(values[i]);
        bool const bothInf = std::isinf(wantBf16) && std::isinf(bf16Back[i]) && (wantBf16 > 0) == (bf16Back[i] > 0);
        if (std::memcmp(&wantBf16, &bf16Back[i], sizeof(float)) != 0 && !bothInf)
        {
            if (++bf16Bad < 5)
            {
                check(false, "bf16 rounding", bf16Back[i], wantBf16);
            }
        }
    }
    std::printf("conversions: %zu values, fp16 mismatches %d, bf16 mismatches %d\n", values.size(), halfBad, bf16Bad);
    check(halfBad == 0, "fp16 conversions");
    check(bf16Bad == 0, "bf16 conversions");
}

void testLastValid()
{
    // Right padding, no past: [1 1 1 0 0] -> 2.
    std::vector<int64_t> right{1, 1, 1, 0, 0};
    check(aligner_ref_last_valid_position(right.data(), 5, 5) == 2, "right padding");
    // Left padding, no past: [0 0 1 1 1] -> 4.
    std::vector<int64_t> left{0, 0, 1, 1, 1};
    check(aligner_ref_last_valid_position(left.data(), 5, 5) == 4, "left padding");
    // Decode step: T = past 4 + S 1, last token valid -> 0.
    check(aligner_ref_last_valid_position(left.data(), 5, 1) == 0, "decode step");
    // Last valid token in the past: clamped to 0.
    check(aligner_ref_last_valid_position(right.data(), 5, 2) == 0, "clamp low");
    // No valid token at all: S - 1.
    std::vector<int64_t> none{0, 0, 0};
    check(aligner_ref_last_valid_position(none.data(), 3, 3) == 2, "empty row");
}

template <typename Element>
void runOps(int32_t storage, float (*load)(Element), bool leftPadding, int64_t B, int64_t S, int64_t H, int64_t past)
{
    std::mt19937 rng(static_cast<uint32_t>(storage * 1000 + H + S + (leftPadding ? 1 : 0)));
    std::normal_distribution<float> normal;
    int64_t const T = past + S;
    std::vector<float> hiddenF(B * S * H), direction(H), vector(H), gateIn(B), gate(B), score(B);
    for (auto& v : hiddenF) v = normal(rng);
    for (auto& v : direction) v = normal(rng);
    for (auto& v : vector) v = normal(rng);
    std::vector<Element> hidden(hiddenF.size()), out(hiddenF.size());
    aligner_ref_float_to_storage(storage, hiddenF.data(), hiddenF.size(), hidden.data());
    std::vector<int64_t> mask(B * T, 0);
    std::vector<int64_t> lengths(B);
    for (int64_t b = 0; b < B; ++b)
    {
        lengths[b] = 1 + (b * 3) % T;
        for (int64_t t = 0; t < lengths[b]; ++t)
        {
            mask[b * T + (leftPadding ? T - 1 - t : t)] = 1;
        }
        gateIn[b] = (b % 3 == 0) ? -1.0f : static_cast<float>(b % 2);
    }
    float const bias = 0.25f;
    check(aligner_ref_steer_gate(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), direction.data(), bias,
              gate.data(), score.data()) == 0, "steer_gate status");
    for (int64_t b = 0; b < B; ++b)
    {
        // Naive last_b: the last valid absolute position, shifted into this call's window, clamped.
        int64_t lastAbs = leftPadding ? T - 1 : lengths[b] - 1;
        int64_t last = lastAbs - past;
        last = last < 0 ? 0 : (last > S - 1 ? S - 1 : last);
        double want = bias;
        for (int64_t h = 0; h < H; ++h)
        {
            want += static_cast<double>(load(hidden[(b * S + last) * H + h])) * direction[h];
        }
        check(std::fabs(score[b] - want) <= 1e-5 * (1.0 + std::sqrt(static_cast<double>(H))), "score", score[b], want);
        float const wantGate = gateIn[b] >= 0.0f ? gateIn[b] : (score[b] > 0.0f ? 1.0f : 0.0f);
        check(gate[b] == wantGate, "gate", gate[b], wantGate);
    }
    check(aligner_ref_steer_shift(storage, hidden.data(), B, S, H, gate.data(), vector.data(), out.data()) == 0,
        "steer_shift status");
    for (int64_t i = 0; i < B * S * H; ++i)
    {
        int64_t const b = i / (S * H);
        double const exact = static_cast<double>(load(hidden[i])) + static_cast<double>(gate[b]) * vector[i % H];
        double const got = load(out[i]);
        // One rounding to the storage type (plus float32 rounding): within one storage ulp of the exact value.
        double const ulp = storage == ALIGNER_REF_FP32 ? 1.2e-7 : (storage == ALIGNER_REF_FP16 ? 9.8e-4 : 7.9e-3);
        if (std::fabs(got - exact) > ulp * std::fabs(exact) + 1e-6)
        {
            check(false, "shift value", got, exact);
            break;
        }
        if (gate[b] == 0.0f && std::memcmp(&hidden[i], &out[i], sizeof(Element)) != 0)
        {
            check(false, "gate 0 leaves hidden bit-identical");
            break;
        }
    }
    // In place gives the same bytes as out of place.
    std::vector<Element> inPlace = hidden;
    aligner_ref_steer_shift(storage, inPlace.data(), B, S, H, gate.data(), vector.data(), inPlace.data());
    check(std::memcmp(inPlace.data(), out.data(), out.size() * sizeof(Element)) == 0, "in-place shift");
}

float loadF32(float v)
{
    return v;
}
float loadF16(uint16_t v)
{
    float f;
    aligner_ref_storage_to_float(ALIGNER_REF_FP16, &v, 1, &f);
    return f;
}
float loadBf16(uint16_t v)
{
    return bitsToFloat(static_cast<uint32_t>(v) << 16);
}
} // namespace

int main()
{
    testConversions();
    testLastValid();
    for (bool left : {false, true})
    {
        for (int64_t H : {1, 7, 64, 133})
        {
            for (int64_t past : {0, 5})
            {
                int64_t const S = past ? 1 : 9;
                runOps<float>(ALIGNER_REF_FP32, loadF32, left, 5, S, H, past);
                runOps<uint16_t>(ALIGNER_REF_FP16, loadF16, left, 5, S, H, past);
                runOps<uint16_t>(ALIGNER_REF_BF16, loadBf16, left, 5, S, H, past);
            }
        }
    }
    std::vector<float> dummy(4);
    std::vector<int64_t> mask(4, 1);
    check(aligner_ref_steer_gate(7, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), 0.f,
              dummy.data(), dummy.data()) == ALIGNER_REF_BAD_STORAGE, "bad storage rejected");
    check(aligner_ref_steer_gate(0, dummy.data(), 1, 2, 1, mask.data(), 1, dummy.data(), dummy.data(), 0.f,
              dummy.data(), dummy.data()) == ALIGNER_REF_BAD_SHAPE, "T < S rejected");
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
