/* InferAligner Edge C API: run an exported, steered model (a TensorRT engine built by `aligner-export build`).
 *
 * Conventions (docs/architecture.md §5 and §8):
 *  - Opaque handles, one prefix (aligner_), create/destroy pairs.
 *  - Every call returns an aligner_status; on failure aligner_last_error() returns a one-line message that stays
 *    valid until the next call on the same thread. No C++ exception crosses this boundary.
 *  - Strings are UTF-8 paths; token ids are int32. The library owns everything it returns; callers free only through
 *    the matching destroy call.
 *  - The KV cache and the gate state live inside the model. Steering follows the runtime protocol of §5 and §5.1
 *    (prefill with steer_gate_in = -1, a second prefill when the manifest's two_pass_prefill says a steered layer lies
 *    below the last gate layer, the gate fed back on every decode step; a non-finite score steers, docs/contract.md).
 *    There is deliberately no way to force the gate off.
 *  - A model handle is not thread-safe: use one per thread, or serialise calls.
 */
#ifndef ALIGNER_RUNTIME_H
#define ALIGNER_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ALIGNER_API __declspec(dllexport)
#else
#define ALIGNER_API __attribute__((visibility("default")))
#endif

/* 2: aligner_result_flags and ALIGNER_FLAG_*; the manifest (format 2) and the constants digests are checked on load.
 * 3: signed exports (aligner_model_options.trusted_keys and .expect_sha256, ALIGNER_ERROR_SIGNATURE); a trusted key
 * configured in the environment or the config directory applies to every load, whatever the program was built with.
 * Every declaration of versions 1 and 2 is unchanged, so programs built against them keep working (their smaller
 * aligner_model_options is accepted: struct_size says which fields it has). */
#define ALIGNER_API_VERSION 3

typedef enum aligner_status
{
    ALIGNER_OK = 0,
    ALIGNER_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a bad option value, an index out of range */
    ALIGNER_ERROR_FILE = 2,             /* a missing or unreadable engine, stamp, manifest or plugin library */
    ALIGNER_ERROR_MISMATCH = 3,         /* engine stamp vs manifest or engine file, TensorRT version or GPU; a
                                           manifest that is not format 2 or lacks a key; steering constants that
                                           differ from the manifest's digests; an unsteered engine */
    ALIGNER_ERROR_PLUGIN = 4,           /* the plugin library could not be loaded or lacks SteerGate/SteerShift */
    ALIGNER_ERROR_TENSORRT = 5,         /* TensorRT refused to deserialise or run the engine */
    ALIGNER_ERROR_CUDA = 6,             /* a CUDA call failed */
    ALIGNER_ERROR_CAPACITY = 7,         /* batch or sequence beyond the engine's optimization profiles */
    ALIGNER_ERROR_INTERNAL = 8,
    ALIGNER_ERROR_SIGNATURE = 9         /* trusted keys are configured and the export is unsigned, its signature file
                                           is malformed, made for another manifest, by a key that is not trusted or
                                           does not verify; or expect_sha256 is not the manifest's sha256 */
} aligner_status;

typedef struct aligner_model aligner_model;
typedef struct aligner_result aligner_result;

/* The message of the last failed call on this thread ("" when none). */
ALIGNER_API const char* aligner_last_error(void);
ALIGNER_API const char* aligner_status_name(aligner_status status);
/* The library version, e.g. "0.1.0". */
ALIGNER_API const char* aligner_version(void);

typedef struct aligner_model_options
{
    uint32_t struct_size;            /* sizeof(aligner_model_options): lets later versions add fields */
    const char* engine_path;         /* ENGINE from `aligner-export build`; ENGINE.json must lie beside it */
    const char* plugin_library_path; /* libaligner_trt_plugins.so (or the _dynamic variant) */
    const char* export_dir;          /* the export directory holding inferaligner.json */
    int32_t device;                  /* CUDA device ordinal */
    /* Since version 3. The trusted Ed25519 public keys (PEM, `aligner-export keygen`'s KEY.pub): files or directories
     * of *.pub, separated by ':'. NULL or "": $INFERALIGNER_TRUSTED_KEYS (the same form), else the directory
     * $INFERALIGNER_CONFIG_DIR/trusted_keys/ (default /etc/inferaligner/trusted_keys/) when it exists, else none.
     * With any key configured only an export signed by one of them loads (docs/integrity.md "Signatures"). */
    const char* trusted_keys;
    /* Since version 3. The sha256 of the export's inferaligner.json (64 hex digits) that must match, with or without
     * keys; NULL: none. */
    const char* expect_sha256;
} aligner_model_options;

ALIGNER_API aligner_status aligner_model_options_init(aligner_model_options* options);

/* Checks the export's signature first (trusted_keys above; ALIGNER_ERROR_SIGNATURE, or ALIGNER_ERROR_FILE for a
 * trusted key that is missing or not an Ed25519 public key), then reads the export's manifest (inferaligner.json,
 * format 2: any other format or a missing key is refused), checks the ENGINE.json stamp against the manifest's
 * sha256, the engine file's sha256, the TensorRT version and the GPU's compute capability, loads the plugin library,
 * deserialises the engine and compares the constants of every steering plugin TensorRT created with the manifest's
 * integrity.constants (ALIGNER_ERROR_MISMATCH naming the node on a difference, a missing node or an unexpected one).
 * Refuses an engine without the steering I/O. */
ALIGNER_API aligner_status aligner_model_create(const aligner_model_options* options, aligner_model** model);
ALIGNER_API aligner_status aligner_model_destroy(aligner_model* model);

typedef struct aligner_model_info
{
    int32_t num_layers;
    int32_t gate_layer;     /* g*: the last gate layer, where the gate is decided */
    int32_t num_steer_layers;
    int32_t vocab_size;
    int32_t max_batch;      /* from the engine's optimization profiles */
    int32_t max_sequence;   /* prompt plus generated tokens */
    int32_t two_pass_prefill; /* 1 when a steered layer lies below the gate layer */
} aligner_model_info;

ALIGNER_API aligner_status aligner_model_get_info(const aligner_model* model, aligner_model_info* info);

/* Called once per generated token; return 0 to continue, non-zero to stop that sequence. */
typedef int32_t (*aligner_token_callback)(void* user_data, int32_t sequence, int32_t token_id);

typedef struct aligner_generate_options
{
    uint32_t struct_size; /* sizeof(aligner_generate_options) */
    int32_t max_new_tokens;
    int32_t do_sample;    /* 0: greedy; 1: top-p sampling */
    float temperature;    /* sampling only, > 0 */
    float top_p;          /* sampling only, in (0, 1] */
    uint64_t seed;        /* sampling only; the same seed gives the same tokens */
    const int32_t* stop_token_ids;
    int32_t num_stop_token_ids;
    aligner_token_callback on_token; /* may be NULL */
    void* user_data;
} aligner_generate_options;

/* Greedy, 128 new tokens, temperature 1, top_p 1, seed 0, no stop tokens, no callback. */
ALIGNER_API aligner_status aligner_generate_options_init(aligner_generate_options* options);

/* Generates for a batch of prompts given as token ids (prompts[i] has prompt_lengths[i] tokens; the chat template is
 * the caller's business). The gate is decided from each prompt and held for the whole sequence. */
ALIGNER_API aligner_status aligner_generate(aligner_model* model, const int32_t* const* prompts,
    const int32_t* prompt_lengths, int32_t batch, const aligner_generate_options* options, aligner_result** result);
ALIGNER_API aligner_status aligner_result_destroy(aligner_result* result);

ALIGNER_API aligner_status aligner_result_num_sequences(const aligner_result* result, int32_t* count);
/* The new tokens of one sequence (stop token included when one ended it). Valid until aligner_result_destroy. */
ALIGNER_API aligner_status aligner_result_tokens(
    const aligner_result* result, int32_t sequence, const int32_t** tokens, int32_t* length);
/* The gate (0 or 1) and the score SteerGate computed for the sequence's prompt. The score is reported as computed, NaN
 * or an infinity included; a non-finite score steers (gate 1), see aligner_result_flags. */
ALIGNER_API aligner_status aligner_result_gate(
    const aligner_result* result, int32_t sequence, float* gate, float* score);

/* Bits of aligner_result_flags. */
#define ALIGNER_FLAG_NONFINITE_SCORE 0x1u /* the prompt's score was NaN or infinite; the sequence was steered */

/* Facts about one sequence's gate as ALIGNER_FLAG_* bits (0: nothing to report). */
ALIGNER_API aligner_status aligner_result_flags(const aligner_result* result, int32_t sequence, uint32_t* flags);

#ifdef __cplusplus
}
#endif

#endif /* ALIGNER_RUNTIME_H */
