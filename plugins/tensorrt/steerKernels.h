// Launchers for the SteerGate and SteerShift CUDA kernels (ARCHITECTURE.md §5). The plugins call them from enqueue;
// tests/gpu/verify_kernels.py calls the C entry points through ctypes, without TensorRT.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALIGNER_KERNEL_API __attribute__((visibility("default")))

/* storage: 0 = float32, 1 = float16, 2 = bfloat16 (as in plugins/common/steerOpsRef.h). All pointers are device
 * pointers. bias is a device pointer to one float, so the constant may come from a plugin field or a graph input.
 * Returns the cudaError_t of the launch (cudaErrorInvalidValue for a bad storage or shape). */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_gate(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, int64_t const* attention_mask, int64_t T, float const* gate_in, float const* direction,
    float const* bias, float* gate, float* score, cudaStream_t stream);

/* out may equal hidden: in place, rows whose gate is 0 are neither read nor written. */
ALIGNER_KERNEL_API int32_t aligner_kernel_steer_shift(int32_t storage, void const* hidden, int64_t B, int64_t S,
    int64_t H, float const* gate, float const* vector, void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
