/* CPU reference of SteerGate (versions 1, 2 and 3) and SteerShift (versions 1 and 2; docs/architecture.md §5, §5.1;
 * docs/contract.md), built on steerOps.h.
 * A plain C ABI so that Python (ctypes), the C++ tests and the GPU verification script can call it.
 * Every function returns 0 on success and a negative value for invalid arguments. */
#ifndef ALIGNER_STEER_OPS_REF_H
#define ALIGNER_STEER_OPS_REF_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ALIGNER_REF_API __declspec(dllexport)
#else
#define ALIGNER_REF_API __attribute__((visibility("default")))
#endif

/* storage: 0 = float32, 1 = float16, 2 = bfloat16 (the bits of one element in a uint16). */
enum
{
    ALIGNER_REF_FP32 = 0,
    ALIGNER_REF_FP16 = 1,
    ALIGNER_REF_BF16 = 2
};

enum
{
    ALIGNER_REF_OK = 0,
    ALIGNER_REF_BAD_STORAGE = -1,
    ALIGNER_REF_BAD_SHAPE = -2,
    ALIGNER_REF_NULL_POINTER = -3,
    ALIGNER_REF_BAD_ATTRIBUTE = -4
};

/* last_b for one mask row of length T, for a call covering the last S positions. */
ALIGNER_REF_API int64_t aligner_ref_last_valid_position(int64_t const* mask_row, int64_t T, int64_t S);

/* hidden [B,S,H] (storage), attention_mask [B,T] int64, gate_in [B], direction [H] -> gate [B], score [B]. */
ALIGNER_REF_API int32_t aligner_ref_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction, float bias, float* gate,
    float* score);

/* SteerGate version 2: hidden [B,S,H] (storage), attention_mask [B,T] int64, gate_in [B], score_in [B], weight [H],
 * bias, tokens (K >= 1), normalize (0 or 1) -> gate [B], score [B]. ALIGNER_REF_BAD_ATTRIBUTE for tokens < 1 or
 * normalize outside {0, 1}. */
ALIGNER_REF_API int32_t aligner_ref_steer_gate_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float bias, int64_t tokens, int32_t normalize, float* gate, float* score);

/* SteerGate version 3 (the pooled gate, issue 18): version 2's arguments and max_weight [H]; the score adds the max
 * over every valid position of this call of n(h) . max_weight (NaN when any of those terms is NaN). */
ALIGNER_REF_API int32_t aligner_ref_steer_gate_v3(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in, float const* weight,
    float const* max_weight, float bias, int64_t tokens, int32_t normalize, float* gate, float* score);

/* hidden [B,S,H] (storage), gate [B], vector [H] -> out [B,S,H] (storage). out may equal hidden (in place). */
ALIGNER_REF_API int32_t aligner_ref_steer_shift(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out);

/* SteerShift version 2 ("norm", issue 17): the same arguments; per position out = y * (||h|| / max(||y||, 1e-6)) with
 * y = hidden + gate[b] * vector (steerOps.h), gate-0 rows copied unchanged. out may equal hidden (in place). */
ALIGNER_REF_API int32_t aligner_ref_steer_shift_v2(int32_t storage, void const* hidden, int64_t B, int64_t S, int64_t H,
    float const* gate, float const* vector, void* out);

/* Element conversions, exposed so tests can check them against independent implementations. */
ALIGNER_REF_API void aligner_ref_float_to_storage(int32_t storage, float const* src, int64_t n, void* dst);
ALIGNER_REF_API void aligner_ref_storage_to_float(int32_t storage, void const* src, int64_t n, float* dst);

#ifdef __cplusplus
}
#endif

#endif
