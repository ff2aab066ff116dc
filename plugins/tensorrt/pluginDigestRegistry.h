/* The constants-digest registry of the plugin library (docs/contract.md "Integrity digests", issue 14).
 *
 * Every SteerGate/SteerShift plugin that TensorRT creates in the runtime phase (createPlugin(name, fc,
 * TensorRTPhase::kRUNTIME), i.e. while deserialising an engine) records (name, op, version, digest of its constants)
 * here. A runtime clears the registry, deserialises the engine, then compares the entries with the manifest's
 * integrity.constants. Both plugin libraries export these functions; call them through dlsym. The registry is
 * process-wide and guarded by a mutex; deserialise one engine at a time while reading it.
 */
#ifndef ALIGNER_PLUGIN_DIGEST_REGISTRY_H
#define ALIGNER_PLUGIN_DIGEST_REGISTRY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALIGNER_PLUGINS_API __attribute__((visibility("default")))

/* Forgets every entry (and invalidates the strings aligner_plugins_digest_at returned). */
ALIGNER_PLUGINS_API void aligner_plugins_digest_reset(void);

/* The number of entries recorded since the last reset. */
ALIGNER_PLUGINS_API int32_t aligner_plugins_digest_count(void);

/* Entry `index` in creation order: the name TensorRT passed (the layer name, which the ONNX parser takes from the
 * node name), the op ("SteerGate"/"SteerShift"), its plugin version and the lowercase hex sha256 of its constants.
 * The strings stay valid until the next reset. Returns 0, or -1 for an index out of range or a NULL pointer. */
ALIGNER_PLUGINS_API int32_t aligner_plugins_digest_at(
    int32_t index, const char** name, const char** op, const char** version, const char** hex);

typedef void (*aligner_plugins_digest_reset_fn)(void);
typedef int32_t (*aligner_plugins_digest_count_fn)(void);
typedef int32_t (*aligner_plugins_digest_at_fn)(int32_t, const char**, const char**, const char**, const char**);

#ifdef __cplusplus
}
#endif

#endif
