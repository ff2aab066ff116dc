// Launchers for the SteerGate (versions 1, 2 and 3) and SteerShift (versions 1 and 2) CUDA kernels (docs/architecture.md
// §5, §5.1; docs/contract.md). The plugins call them from enqueue; tests/gpu/verify_kernels.py calls the C entry points
// through ctypes, without TensorRT.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALIGNER_KERNEL_API __attribute__((visibility("default")))

/* storage: 0 = float32, 1 = float16, 2 = bfloat16 (as in plugins/common/steerOpsRef.h). All pointers are device
 * pointers; bias is a value. Returns the cudaError_t of the launch (cudaErrorInvalidValue for a bad storage, shape or
 * attribute). */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction, float bias,
    float* gate, float* score, cudaStream_t stream);

/* SteerGate version 2: score_in [B] and weight [H] on the device, tokens = K >= 1, normalize 0 or 1. */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_gate_v2(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in,
    float const* weight, float bias, int64_t tokens, int32_t normalize, float* gate, float* score,
    cudaStream_t stream);

/* SteerGate version 3 (the pooled gate, issue 18): version 2's arguments and max_weight [H] on the device. */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_gate_v3(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, int64_t const* attention_mask, int64_t T, float const* gate_in, float const* score_in,
    float const* weight, float const* max_weight, float bias, int64_t tokens, int32_t normalize, float* gate,
    float* score, cudaStream_t stream);

/* out may equal hidden: in place, rows whose gate is 0 are neither read nor written. */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_shift(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, float const* gate, float const* vector, void* out, cudaStream_t stream);

/* SteerShift version 2 ("norm"): the same arguments; one block per position. In place, gate-0 rows are neither read
 * nor written. */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_shift_v2(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, float const* gate, float const* vector, void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
