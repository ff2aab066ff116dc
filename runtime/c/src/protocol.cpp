#include "protocol.h"

#include <cmath>

#include "aligner_runtime.h"
#include "steerOps.h"

namespace aligner
{
namespace runtime
{

void positionIdsForCall(int64_t const* mask, int64_t B, int64_t T, int64_t S, int64_t* out)
{
    for (int64_t b = 0; b < B; ++b)
    {
        int64_t real = 0;
        for (int64_t t = 0; t < T; ++t)
        {
            bool const token = mask[b * T + t] == 1;
            real += mask[b * T + t]; // cumsum(mask), as contract.position_ids
            if (t >= T - S)
            {
                out[b * S + (t - (T - S))] = token ? real - 1 : 1;
            }
        }
    }
}

float prefillGate(float gate, float score)
{
    return (!ops::isFinite(score) || gate != 0.0f) ? 1.0f : 0.0f;
}

float strengthAt(double halfLife, double floor, int64_t step)
{
    if (halfLife <= 0.0 || step <= 0)
    {
        return 1.0f;
    }
    return static_cast<float>(floor + (1.0 - floor) * std::pow(0.5, static_cast<double>(step) / halfLife));
}

float endBonus(int64_t after, double slope, int64_t tokenIndex)
{
    if (after < 0 || tokenIndex <= after)
    {
        return 0.0f;
    }
    return static_cast<float>(slope) * static_cast<float>(tokenIndex - after);
}

uint32_t rowFlags(float score)
{
    return ops::isFinite(score) ? 0u : ALIGNER_FLAG_NONFINITE_SCORE;
}

} // namespace runtime
} // namespace aligner
