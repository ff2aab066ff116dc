// The host-side rules of the runtime protocol that the C generation loop applies (docs/architecture.md §5,
// docs/contract.md): the position ids of a padded batch, and the gate the loop keeps for a row after the scoring
// prefill. Host-only, so ctest runtime_helpers covers them without TensorRT.
#pragma once

#include <cstdint>

namespace aligner
{
namespace runtime
{

// The position ids of the last S positions of a batch whose attention mask is mask [B, T] (T >= S): HF's rule, as
// aligner_runtime.contract.position_ids writes it: the count of real tokens up to and including t minus one, and 1 at
// padding. out is [B, S].
void positionIdsForCall(int64_t const* mask, int64_t B, int64_t T, int64_t S, int64_t* out);

// The gate a row keeps after the scoring prefill (steer_gate_in = -1). The graph already steers on a non-finite score
// (docs/contract.md, "The decision"); the loop must never undo that, so a non-finite score gives 1 whatever came back,
// and so does any gate other than an exact 0.
float prefillGate(float gate, float score);

// The strength a steered row is shifted with on decode step `step` (1 for the first generated token; the prompt is
// step 0): floor + (1 - floor) * 0.5^(step / halfLife), and 1 when halfLife is 0 (the constant shift). The loop feeds
// steer_gate_in = decision * strength (docs/contract.md "Strength schedule"), as aligner_runtime.contract does.
float strengthAt(double halfLife, double floor, int64_t step);

// The end rule's logit bonus for new token `tokenIndex` (0 for the first) of a steered row: slope * (tokenIndex -
// after) in float32 past `after`, else 0; 0 when after < 0 (no rule). docs/contract.md "Ending a steered answer",
// as aligner_runtime.contract.EndRule.bonus.
float endBonus(int64_t after, double slope, int64_t tokenIndex);

// ALIGNER_FLAG_* bits (aligner_runtime.h) of a row whose prompt scored `score`.
uint32_t rowFlags(float score);

} // namespace runtime
} // namespace aligner
