// The generation loop: the runtime protocol of docs/architecture.md §5 / §5.1 over a left-padded batch. The KV cache
// stays on the device; only the last position's logits come back to the host for sampling.
#include "runtimeInternal.h"

#include "protocol.h"
#include "steerOps.h"

#include <cmath>
#include <random>

using namespace nvinfer1;

namespace aligner
{
namespace runtime
{
namespace
{
// Runs one forward: batch rows, seq new positions over past cached ones. Inputs are already on the device.
void forward(aligner_model& model, int32_t batch, int32_t seq, int32_t past)
{
    IExecutionContext& ctx = *model.context;
    SteeringIo const& io = model.manifest.io;
    int32_t const profile = (seq == 1) ? model.decodeProfile : 0;
    if (profile != model.currentProfile)
    {
        if (!ctx.setOptimizationProfileAsync(profile, model.stream))
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, "cannot select optimization profile " + std::to_string(profile));
        }
        model.currentProfile = profile;
    }
    auto setInput = [&](std::string const& name, Dims dims, void* data) {
        if (!ctx.setInputShape(name.c_str(), dims) || !ctx.setTensorAddress(name.c_str(), data))
        {
            throw Failure(ALIGNER_ERROR_CAPACITY, "shape of '" + name + "' outside the engine's profile: "
                    + model.logger.lastError());
        }
    };
    auto setOutput = [&](std::string const& name, void* data) {
        if (!ctx.setTensorAddress(name.c_str(), data))
        {
            throw Failure(ALIGNER_ERROR_TENSORRT, "cannot bind '" + name + "'");
        }
    };
    setInput("input_ids", Dims2{batch, seq}, model.inputIds.data);
    setInput("position_ids", Dims2{batch, seq}, model.positionIds.data);
    setInput("attention_mask", Dims2{batch, past + seq}, model.attentionMask.data);
    setInput(io.gateIn, Dims{1, {batch}}, model.gateIn.data);
    auto& pastSide = model.kv[model.kvCurrent];
    auto& presentSide = model.kv[1 - model.kvCurrent];
    for (int32_t layer = 0; layer < model.numLayers; ++layer)
    {
        for (int32_t kind = 0; kind < 2; ++kind)
        {
            std::string const suffix = std::to_string(layer) + (kind == 0 ? ".key" : ".value");
            setInput("past_key_values." + suffix, Dims4{batch, model.kvHeads, past, model.headDim},
                pastSide[2 * layer + kind].data);
            setOutput("present." + suffix, presentSide[2 * layer + kind].data);
        }
    }
    setOutput("logits", model.logits.data);
    setOutput(io.gate, model.gateOut.data);
    setOutput(io.score, model.scoreOut.data);
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

float toFloat(void const* base, size_t index, DataType type)
{
    if (type == DataType::kFLOAT)
    {
        return static_cast<float const*>(base)[index];
    }
    uint16_t const bits = static_cast<uint16_t const*>(base)[index];
    return type == DataType::kBF16 ? ops::bf16ToFloat(bits) : ops::halfToFloat(bits);
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
} // namespace

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
    // Left padding: every row's last prompt token sits at position longest - 1, so decode steps stay aligned. The
    // mask holds every position the call will reach; each forward sees its first `total` columns.
    int32_t const S = longest;
    int32_t const T = S + options.max_new_tokens;
    std::vector<int64_t> ids(static_cast<size_t>(batch) * S, 0);
    std::vector<int64_t> mask(static_cast<size_t>(batch) * T, 0);
    for (int32_t b = 0; b < batch; ++b)
    {
        int32_t const pad = S - lengths[b];
        for (int32_t i = 0; i < lengths[b]; ++i)
        {
            ids[static_cast<size_t>(b) * S + pad + i] = prompts[b][i];
            mask[static_cast<size_t>(b) * T + pad + i] = 1;
        }
    }
    // The mask's first `total` columns, uploaded, and the position ids of the call's last `seq` of them.
    std::vector<int64_t> positions(static_cast<size_t>(batch) * S);
    auto uploadMaskAndPositions = [&](int32_t total, int32_t seq) {
        std::vector<int64_t> packed(static_cast<size_t>(batch) * total);
        for (int32_t b = 0; b < batch; ++b)
        {
            std::copy_n(&mask[static_cast<size_t>(b) * T], total, &packed[static_cast<size_t>(b) * total]);
        }
        positionIdsForCall(packed.data(), batch, total, seq, positions.data());
        upload(model.attentionMask, packed.data(), packed.size() * 8, model.stream);
        upload(model.positionIds, positions.data(), static_cast<size_t>(batch) * seq * 8, model.stream);
    };

    // Prefill with steer_gate_in = -1: SteerGate decides from the prompt (§5 step 1).
    std::vector<float> gateIn(batch, -1.0f);
    auto prefill = [&]() {
        model.kvCurrent = 0;
        upload(model.inputIds, ids.data(), ids.size() * 8, model.stream);
        uploadMaskAndPositions(S, S);
        upload(model.gateIn, gateIn.data(), gateIn.size() * 4, model.stream);
        forward(model, batch, S, 0);
    };
    prefill();
    result.gate.assign(batch, 0.0f);
    result.score.assign(batch, 0.0f);
    result.flags.assign(batch, 0u);
    cudaCheck(cudaMemcpy(result.gate.data(), model.gateOut.data, batch * 4, cudaMemcpyDeviceToHost),
        model.manifest.io.gate.c_str());
    cudaCheck(cudaMemcpy(result.score.data(), model.scoreOut.data, batch * 4, cudaMemcpyDeviceToHost),
        model.manifest.io.score.c_str());
    // The scoring pass decided; a non-finite score steers and the loop keeps it so (docs/contract.md). The score is
    // reported as computed.
    for (int32_t b = 0; b < batch; ++b)
    {
        result.gate[b] = prefillGate(result.gate[b], result.score[b]);
        result.flags[b] = rowFlags(result.score[b]);
    }
    // §5 step 2: steered layers below g* saw gate 0 in the scoring pass; run the steered pass when the manifest says
    // so. The batch runs again with the decided gates, so rows whose gate is 0 compute what they computed before.
    bool const anyGate = std::any_of(result.gate.begin(), result.gate.end(), [](float g) { return g > 0.0f; });
    if (model.manifest.twoPassPrefill && anyGate)
    {
        gateIn = result.gate;
        prefill();
    }
    // §5 step 3: the decision is fed back on every decode step (times the strength schedule, below).

    std::vector<bool> done(batch, false);
    result.tokens.assign(batch, {});
    std::vector<std::mt19937_64> rngs;
    for (int32_t b = 0; b < batch; ++b)
    {
        rngs.emplace_back(options.seed + static_cast<uint64_t>(b) * 0x9e3779b97f4a7c15ull);
    }
    std::vector<float> logits;
    std::vector<int64_t> stepIds(batch);
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
                // The end rule raises the end-of-sequence logits of steered rows only; a gate-0 row is untouched.
                float const bonus = result.gate[b] > 0.0f
                    ? endBonus(model.manifest.endRuleAfter, model.manifest.endRuleSlope,
                        static_cast<int64_t>(result.tokens[b].size()))
                    : 0.0f;
                if (bonus != 0.0f)
                {
                    for (int64_t eos : model.manifest.eosTokenIds)
                    {
                        if (eos < model.vocab)
                        {
                            logits[static_cast<size_t>(b) * model.vocab + static_cast<size_t>(eos)] += bonus;
                        }
                    }
                }
                token = pickToken(&logits[static_cast<size_t>(b) * model.vocab], model.vocab, options, rngs[b]);
                result.tokens[b].push_back(token);
                bool const stop = std::find(options.stop_token_ids, options.stop_token_ids + options.num_stop_token_ids,
                                      token) != options.stop_token_ids + options.num_stop_token_ids;
                bool const cancelled = options.on_token != nullptr && options.on_token(options.user_data, b, token) != 0;
                done[b] = stop || cancelled;
            }
            stepIds[b] = token;
            mask[static_cast<size_t>(b) * T + S + step] = 1;
            allDone = allDone && done[b];
        }
        if (allDone || step + 1 == options.max_new_tokens)
        {
            break;
        }
        upload(model.inputIds, stepIds.data(), batch * 8, model.stream);
        uploadMaskAndPositions(S + step + 1, 1);
        // The decision, scaled by the strength schedule on this decode step (docs/contract.md).
        float const strength = strengthAt(model.manifest.strengthHalfLife, model.manifest.strengthFloor, step + 1);
        for (int32_t b = 0; b < batch; ++b)
        {
            gateIn[b] = result.gate[b] * strength;
        }
        upload(model.gateIn, gateIn.data(), batch * 4, model.stream);
        forward(model, batch, 1, S + step);
        seq = 1;
    }
}

} // namespace runtime
} // namespace aligner
