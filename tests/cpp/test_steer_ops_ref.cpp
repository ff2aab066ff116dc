// ctest: the CPU reference (plugins/common) against naive loops written independently here: float64 accumulation,
// the compiler's own _Float16 for binary16 rounding, and a nearest-value search for bfloat16 rounding. SteerGate
// versions 1, 2 and 3 (docs/contract.md), the NaN-safe decision, and SteerShift.
#include "steerOpsRef.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
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

// The decision of docs/contract.md, written out: a non-finite score steers.
float naiveDecision(float gateIn, double score)
{
    if (gateIn >= 0.0f)
    {
        return gateIn;
    }
    return (std::isnan(score) || std::isinf(score) || score > 0.0) ? 1.0f : 0.0f;
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
        if (past > 0 && gateIn[b] >= 0.0f)
        {
            // The score at decode (docs/contract.md, issue 20): a forced row of a call with a past is not scored.
            check(score[b] == 0.0f && !std::signbit(score[b]), "decode: forced row's score is 0", score[b], 0.0);
            check(gate[b] == gateIn[b], "decode: forced row's gate is gate_in", gate[b], gateIn[b]);
            continue;
        }
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
        float const wantGate = naiveDecision(gateIn[b], score[b]);
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

// SteerGate version 2 against a naive loop: the pooled positions are the last `tokens` valid positions of the call
// (all when fewer; version 1's last_b when none), each term in float64, a mean, then score_in and the bias.
template <typename Element>
void runGateV2(int32_t storage, float (*load)(Element), bool leftPadding, int64_t B, int64_t S, int64_t H,
    int64_t past, int64_t tokens, int32_t normalize)
{
    std::mt19937 rng(static_cast<uint32_t>(storage * 7919 + H * 31 + S + tokens * 3 + normalize + (leftPadding ? 1 : 0)));
    std::normal_distribution<float> normal;
    int64_t const T = past + S;
    std::vector<float> hiddenF(B * S * H), weight(H), gateIn(B), scoreIn(B), gate(B), score(B);
    for (auto& v : hiddenF) v = 3.0f * normal(rng);
    for (auto& v : weight) v = normal(rng);
    for (auto& v : scoreIn) v = normal(rng);
    std::vector<Element> hidden(hiddenF.size());
    aligner_ref_float_to_storage(storage, hiddenF.data(), hiddenF.size(), hidden.data());
    std::vector<int64_t> mask(B * T, 0);
    for (int64_t b = 0; b < B; ++b)
    {
        int64_t const length = b == B - 1 ? 0 : 1 + (b * 3) % T; // the last row has no valid token at all
        for (int64_t t = 0; t < length; ++t)
        {
            mask[b * T + (leftPadding ? T - 1 - t : t)] = 1;
        }
        gateIn[b] = (b % 3 == 0) ? -1.0f : (b % 3 == 1 ? -1.0f : static_cast<float>(b % 2));
    }
    float const bias = -0.125f;
    check(aligner_ref_steer_gate_v2(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), scoreIn.data(),
              weight.data(), bias, tokens, normalize, gate.data(), score.data()) == 0, "steer_gate_v2 status");
    for (int64_t b = 0; b < B; ++b)
    {
        if (past > 0 && gateIn[b] >= 0.0f)
        {
            check(score[b] == 0.0f && !std::signbit(score[b]), "v2 decode: forced row's score is 0", score[b], 0.0);
            check(gate[b] == gateIn[b], "v2 decode: forced row's gate is gate_in", gate[b], gateIn[b]);
            continue;
        }
        std::vector<int64_t> valid;
        for (int64_t s = 0; s < S; ++s)
        {
            if (mask[b * T + past + s] == 1)
            {
                valid.push_back(s);
            }
        }
        std::vector<int64_t> pooled;
        if (valid.empty())
        {
            int64_t lastAbs = -1;
            for (int64_t t = 0; t < T; ++t)
            {
                lastAbs = mask[b * T + t] == 1 ? t : lastAbs;
            }
            int64_t last = lastAbs < 0 ? S - 1 : lastAbs - past;
            pooled.push_back(last < 0 ? 0 : (last > S - 1 ? S - 1 : last));
        }
        else
        {
            size_t const first = valid.size() > static_cast<size_t>(tokens) ? valid.size() - tokens : 0;
            pooled.assign(valid.begin() + first, valid.end());
        }
        double sum = 0.0;
        for (int64_t s : pooled)
        {
            double dot = 0.0, norm2 = 0.0;
            for (int64_t h = 0; h < H; ++h)
            {
                double const x = load(hidden[(b * S + s) * H + h]);
                dot += x * weight[h];
                norm2 += x * x;
            }
            sum += normalize ? dot / std::max(std::sqrt(norm2), 1e-6) : dot;
        }
        double const want = static_cast<double>(scoreIn[b]) + sum / pooled.size() + bias;
        double const scale = normalize ? 1.0 : 3.0 * std::sqrt(static_cast<double>(H));
        check(std::fabs(score[b] - want) <= 2e-6 * (1.0 + scale * std::sqrt(static_cast<double>(pooled.size()))),
            "v2 score", score[b], want);
        check(gate[b] == naiveDecision(gateIn[b], score[b]), "v2 gate", gate[b], naiveDecision(gateIn[b], score[b]));
    }

    // K = 1, no normalisation, score_in = 0, weight = a direction: version 1 exactly, bit for bit.
    if (tokens == 1 && normalize == 0)
    {
        std::vector<float> zeros(B, 0.0f), gate1(B), score1(B), gate2(B), score2(B);
        aligner_ref_steer_gate(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), weight.data(), bias,
            gate1.data(), score1.data());
        aligner_ref_steer_gate_v2(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), zeros.data(),
            weight.data(), bias, 1, 0, gate2.data(), score2.data());
        check(std::memcmp(score1.data(), score2.data(), B * sizeof(float)) == 0
                && std::memcmp(gate1.data(), gate2.data(), B * sizeof(float)) == 0,
            "v2 with K=1, normalize=0, score_in=0 equals v1 bit for bit");
    }
}

// SteerGate version 3 (issue 18) against a naive loop: version 2's pooled mean plus the max over every valid
// position of the call (version 1's last_b when none) of the position's term with max_weight, in float64.
template <typename Element>
void runGateV3(int32_t storage, float (*load)(Element), bool leftPadding, int64_t B, int64_t S, int64_t H,
    int64_t past, int64_t tokens, int32_t normalize)
{
    std::mt19937 rng(static_cast<uint32_t>(storage * 104729 + H * 37 + S + tokens * 5 + normalize + (leftPadding ? 1 : 0)));
    std::normal_distribution<float> normal;
    int64_t const T = past + S;
    std::vector<float> hiddenF(B * S * H), weight(H), maxWeight(H), gateIn(B), scoreIn(B), gate(B), score(B);
    for (auto& v : hiddenF) v = 3.0f * normal(rng);
    for (auto& v : weight) v = normal(rng);
    for (auto& v : maxWeight) v = 2.0f * normal(rng);
    for (auto& v : scoreIn) v = normal(rng);
    std::vector<Element> hidden(hiddenF.size());
    aligner_ref_float_to_storage(storage, hiddenF.data(), hiddenF.size(), hidden.data());
    std::vector<int64_t> mask(B * T, 0);
    for (int64_t b = 0; b < B; ++b)
    {
        int64_t const length = b == B - 1 ? 0 : 1 + (b * 3) % T; // the last row has no valid token at all
        for (int64_t t = 0; t < length; ++t)
        {
            mask[b * T + (leftPadding ? T - 1 - t : t)] = 1;
        }
        gateIn[b] = (b % 3 == 2) ? static_cast<float>(b % 2) : -1.0f;
    }
    float const bias = -0.125f;
    check(aligner_ref_steer_gate_v3(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), scoreIn.data(),
              weight.data(), maxWeight.data(), bias, tokens, normalize, gate.data(), score.data()) == 0,
        "steer_gate_v3 status");
    auto term = [&](int64_t b, int64_t s, std::vector<float> const& w) {
        double dot = 0.0, norm2 = 0.0;
        for (int64_t h = 0; h < H; ++h)
        {
            double const x = load(hidden[(b * S + s) * H + h]);
            dot += x * w[h];
            norm2 += x * x;
        }
        return normalize ? dot / std::max(std::sqrt(norm2), 1e-6) : dot;
    };
    for (int64_t b = 0; b < B; ++b)
    {
        if (past > 0 && gateIn[b] >= 0.0f)
        {
            check(score[b] == 0.0f && !std::signbit(score[b]), "v3 decode: forced row's score is 0", score[b], 0.0);
            check(gate[b] == gateIn[b], "v3 decode: forced row's gate is gate_in", gate[b], gateIn[b]);
            continue;
        }
        std::vector<int64_t> valid;
        for (int64_t s = 0; s < S; ++s)
        {
            if (mask[b * T + past + s] == 1)
            {
                valid.push_back(s);
            }
        }
        std::vector<int64_t> pooled, maxed;
        if (valid.empty())
        {
            int64_t lastAbs = -1;
            for (int64_t t = 0; t < T; ++t)
            {
                lastAbs = mask[b * T + t] == 1 ? t : lastAbs;
            }
            int64_t last = lastAbs < 0 ? S - 1 : lastAbs - past;
            pooled.push_back(last < 0 ? 0 : (last > S - 1 ? S - 1 : last));
            maxed = pooled;
        }
        else
        {
            size_t const first = valid.size() > static_cast<size_t>(tokens) ? valid.size() - tokens : 0;
            pooled.assign(valid.begin() + first, valid.end());
            maxed = valid;
        }
        double sum = 0.0;
        for (int64_t s : pooled)
        {
            sum += term(b, s, weight);
        }
        double top = -std::numeric_limits<double>::infinity();
        for (int64_t s : maxed)
        {
            top = std::max(top, term(b, s, maxWeight));
        }
        double const want = static_cast<double>(scoreIn[b]) + sum / pooled.size() + top + bias;
        double const scale = normalize ? 2.0 : 6.0 * std::sqrt(static_cast<double>(H));
        check(std::fabs(score[b] - want) <= 4e-6 * (1.0 + scale * std::sqrt(static_cast<double>(maxed.size()))),
            "v3 score", score[b], want);
        check(gate[b] == naiveDecision(gateIn[b], score[b]), "v3 gate", gate[b], naiveDecision(gateIn[b], score[b]));
    }

    // max_weight = 0: version 2's score bit for bit (adding the max term's 0).
    std::vector<float> zeros(H, 0.0f), gate2(B), score2(B), gate3(B), score3(B);
    aligner_ref_steer_gate_v2(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), scoreIn.data(),
        weight.data(), bias, tokens, normalize, gate2.data(), score2.data());
    aligner_ref_steer_gate_v3(storage, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), scoreIn.data(),
        weight.data(), zeros.data(), bias, tokens, normalize, gate3.data(), score3.data());
    check(std::memcmp(score2.data(), score3.data(), B * sizeof(float)) == 0
            && std::memcmp(gate2.data(), gate3.data(), B * sizeof(float)) == 0,
        "v3 with max_weight = 0 equals v2 bit for bit");
}

// Version 3's max: a NaN at one of its positions makes the score NaN (which steers); a NaN or a huge value at a
// padded position never enters; a row with no valid position reads last_b alone.
void testGateV3Max()
{
    int64_t const B = 4, S = 3, H = 2, T = 3;
    float const nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> hidden(B * S * H, 0.0f);
    for (int64_t i = 0; i < B * S; ++i)
    {
        hidden[i * H] = 1.0f;
    }
    hidden[(0 * S + 0) * H + 1] = nan;   // row 0: a valid position, not among the last K = 1
    hidden[(1 * S + 0) * H + 1] = nan;   // row 1: a padded position
    hidden[(2 * S + 0) * H + 1] = 1e6f;  // row 2: a huge term at a padded position
    hidden[(3 * S + 1) * H + 1] = 5.0f;  // row 3: no valid position; last_b = S - 1 reads 0
    hidden[(3 * S + 2) * H + 1] = -2.0f; // ... and only last_b: -2
    std::vector<int64_t> mask = {1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0};
    std::vector<float> weight(H, 0.0f), maxWeight = {0.0f, 1.0f}, gateIn(B, -1.0f), scoreIn(B, 0.0f), gate(B),
        score(B);
    check(aligner_ref_steer_gate_v3(ALIGNER_REF_FP32, hidden.data(), B, S, H, mask.data(), T, gateIn.data(),
              scoreIn.data(), weight.data(), maxWeight.data(), 0.5f, 1, 0, gate.data(), score.data()) == 0,
        "v3 max status");
    check(std::isnan(score[0]) && gate[0] == 1.0f, "v3: a NaN among the max's positions makes the score NaN");
    check(score[1] == 0.5f && score[2] == 0.5f, "v3: padded positions do not enter the max", score[2], 0.5);
    check(score[3] == -1.5f && gate[3] == 0.0f, "v3: a row without valid positions reads last_b", score[3], -1.5);
}

// Non-finite scores steer; gate_in >= 0 still wins; a NaN gate_in falls through to the score.
void testNonFiniteDecision()
{
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    int64_t const B = 6, S = 2, H = 3, T = 2;
    // Row b reads position 1 (the mask is all ones); direction (1, 0, 0), so the score is hidden[b, 1, 0] + bias.
    std::vector<float> hidden(B * S * H, 0.0f);
    float const firstValues[B] = {nan, inf, -inf, nan, -1.0f, nan};
    for (int64_t b = 0; b < B; ++b)
    {
        hidden[(b * S + 1) * H] = firstValues[b];
    }
    std::vector<int64_t> mask(B * T, 1);
    std::vector<float> const gateIn{-1.0f, -1.0f, -1.0f, 0.0f, nan, nan};
    std::vector<float> direction{1.0f, 0.0f, 0.0f}, gate(B), score(B);
    check(aligner_ref_steer_gate(ALIGNER_REF_FP32, hidden.data(), B, S, H, mask.data(), T, gateIn.data(),
              direction.data(), 0.0f, gate.data(), score.data()) == 0, "non-finite case status");
    float const want[B] = {1.0f, 1.0f, 1.0f, 0.0f, 0.0f, 1.0f};
    for (int64_t b = 0; b < B; ++b)
    {
        check(gate[b] == want[b], "non-finite decision (v1)", gate[b], want[b]);
    }
    check(std::isnan(score[0]) && score[1] == inf && score[2] == -inf, "the score is reported as computed");
    // A NaN bias makes every score NaN: every deciding row steers.
    aligner_ref_steer_gate(ALIGNER_REF_FP32, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), direction.data(),
        nan, gate.data(), score.data());
    check(gate[4] == 1.0f, "a NaN bias steers");
    // Version 2: the same rows, the score through score_in as well.
    std::vector<float> scoreIn{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    aligner_ref_steer_gate_v2(ALIGNER_REF_FP32, hidden.data(), B, S, H, mask.data(), T, gateIn.data(), scoreIn.data(),
        direction.data(), 0.0f, 2, 1, gate.data(), score.data());
    for (int64_t b = 0; b < B; ++b)
    {
        check(gate[b] == want[b], "non-finite decision (v2, normalised)", gate[b], want[b]);
    }
    std::vector<float> zeroHidden(B * S * H, 0.0f);
    scoreIn = {nan, inf, -inf, nan, -1.0f, -inf};
    aligner_ref_steer_gate_v2(ALIGNER_REF_FP32, zeroHidden.data(), B, S, H, mask.data(), T, gateIn.data(),
        scoreIn.data(), direction.data(), 0.0f, 1, 0, gate.data(), score.data());
    for (int64_t b = 0; b < B; ++b)
    {
        check(gate[b] == want[b], "non-finite score_in steers (v2)", gate[b], want[b]);
    }
    // Normalising a zero row divides by 1e-6, not by 0: the score stays finite.
    scoreIn.assign(B, 0.0f);
    std::vector<float> const decide(B, -1.0f);
    aligner_ref_steer_gate_v2(ALIGNER_REF_FP32, zeroHidden.data(), B, S, H, mask.data(), T, decide.data(),
        scoreIn.data(), direction.data(), 0.0f, 1, 1, gate.data(), score.data());
    check(score[0] == 0.0f && gate[0] == 0.0f, "a zero row normalises to a zero term");
}

// The score at decode (docs/contract.md, issue 20): past > 0 and gate_in >= 0 (+inf included): gate = gate_in, score
// 0; a NaN or negative gate_in is scored; a prefill (T == S) scores its forced rows too. Both versions.
void testScoreAtDecode()
{
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    int64_t const B = 4, H = 2;
    std::vector<float> const hidden{1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f}; // [B, 1, H]
    std::vector<float> const direction{0.5f, 0.25f}, scoreIn{1.0f, 1.0f, 1.0f, 1.0f};
    std::vector<int64_t> const decodeMask(B * 3, 1);
    std::vector<float> const gateIn{inf, nan, 1.0f, -1.0f};
    for (int version : {1, 2})
    {
        std::vector<float> gate(B), score(B);
        int32_t const status = version == 1
            ? aligner_ref_steer_gate(ALIGNER_REF_FP32, hidden.data(), B, 1, H, decodeMask.data(), 3, gateIn.data(),
                direction.data(), 0.5f, gate.data(), score.data())
            : aligner_ref_steer_gate_v2(ALIGNER_REF_FP32, hidden.data(), B, 1, H, decodeMask.data(), 3, gateIn.data(),
                scoreIn.data(), direction.data(), 0.5f, 1, 0, gate.data(), score.data());
        check(status == 0, "decode status");
        float const extra = version == 1 ? 0.0f : 1.0f;
        check(gate[0] == inf && score[0] == 0.0f, "decode: an infinite gate_in is forced, not scored", score[0]);
        check(score[1] == 3.0f * 0.5f + 4.0f * 0.25f + 0.5f + extra && gate[1] == 1.0f,
            "decode: a NaN gate_in is scored", score[1]);
        check(gate[2] == 1.0f && score[2] == 0.0f, "decode: gate_in 1 is not scored", score[2]);
        check(score[3] == 7.0f * 0.5f + 8.0f * 0.25f + 0.5f + extra, "decode: gate_in -1 is scored", score[3]);
        std::vector<int64_t> const prefillMask(B, 1);
        std::vector<float> const forced{1.0f, 0.0f, 1.0f, 0.0f};
        if (version == 1)
        {
            aligner_ref_steer_gate(ALIGNER_REF_FP32, hidden.data(), B, 1, H, prefillMask.data(), 1, forced.data(),
                direction.data(), 0.5f, gate.data(), score.data());
        }
        else
        {
            aligner_ref_steer_gate_v2(ALIGNER_REF_FP32, hidden.data(), B, 1, H, prefillMask.data(), 1, forced.data(),
                scoreIn.data(), direction.data(), 0.5f, 1, 0, gate.data(), score.data());
        }
        check(score[0] == 1.0f * 0.5f + 2.0f * 0.25f + 0.5f + extra && gate[0] == 1.0f && gate[1] == 0.0f,
            "a forced prefill is scored", score[0]);
    }
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
                for (int64_t tokens : {1, 3, 12})
                {
                    for (int32_t normalize : {0, 1})
                    {
                        runGateV2<float>(ALIGNER_REF_FP32, loadF32, left, 5, S, H, past, tokens, normalize);
                        runGateV2<uint16_t>(ALIGNER_REF_FP16, loadF16, left, 5, S, H, past, tokens, normalize);
                        runGateV2<uint16_t>(ALIGNER_REF_BF16, loadBf16, left, 5, S, H, past, tokens, normalize);
                        runGateV3<float>(ALIGNER_REF_FP32, loadF32, left, 5, S, H, past, tokens, normalize);
                        runGateV3<uint16_t>(ALIGNER_REF_FP16, loadF16, left, 5, S, H, past, tokens, normalize);
                        runGateV3<uint16_t>(ALIGNER_REF_BF16, loadBf16, left, 5, S, H, past, tokens, normalize);
                    }
                }
            }
        }
    }
    testNonFiniteDecision();
    testScoreAtDecode();
    testGateV3Max();
    std::vector<float> dummy(4);
    std::vector<int64_t> mask(4, 1);
    check(aligner_ref_steer_gate(7, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), 0.f,
              dummy.data(), dummy.data()) == ALIGNER_REF_BAD_STORAGE, "bad storage rejected");
    check(aligner_ref_steer_gate(0, dummy.data(), 1, 2, 1, mask.data(), 1, dummy.data(), dummy.data(), 0.f,
              dummy.data(), dummy.data()) == ALIGNER_REF_BAD_SHAPE, "T < S rejected");
    check(aligner_ref_steer_gate_v2(0, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), dummy.data(),
              0.f, 0, 0, dummy.data(), dummy.data()) == ALIGNER_REF_BAD_ATTRIBUTE, "v2 tokens < 1 rejected");
    check(aligner_ref_steer_gate_v2(0, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), dummy.data(),
              0.f, 1, 2, dummy.data(), dummy.data()) == ALIGNER_REF_BAD_ATTRIBUTE, "v2 normalize = 2 rejected");
    check(aligner_ref_steer_gate_v2(0, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), nullptr, dummy.data(),
              0.f, 1, 0, dummy.data(), dummy.data()) == ALIGNER_REF_NULL_POINTER, "v2 without score_in rejected");
    check(aligner_ref_steer_gate_v3(0, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), dummy.data(),
              nullptr, 0.f, 1, 0, dummy.data(), dummy.data()) == ALIGNER_REF_NULL_POINTER, "v3 without max_weight rejected");
    check(aligner_ref_steer_gate_v3(0, dummy.data(), 1, 1, 1, mask.data(), 1, dummy.data(), dummy.data(), dummy.data(),
              dummy.data(), 0.f, 0, 0, dummy.data(), dummy.data()) == ALIGNER_REF_BAD_ATTRIBUTE, "v3 tokens < 1 rejected");
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
