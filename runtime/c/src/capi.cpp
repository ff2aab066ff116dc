// The C ABI of include/aligner_runtime.h: argument checks, the (status, last error) convention, and the result
// accessors. No C++ exception crosses this boundary: every call that can fail runs inside guarded().
#include "runtimeInternal.h"

#include <cstring>

using aligner::runtime::Failure;

namespace
{
thread_local std::string gLastError;

template <typename F>
aligner_status guarded(F&& body)
{
    try
    {
        body();
        gLastError.clear();
        return ALIGNER_OK;
    }
    catch (Failure const& failure)
    {
        gLastError = failure.what();
        return failure.status;
    }
    catch (std::bad_alloc const&)
    {
        gLastError = "out of host memory";
        return ALIGNER_ERROR_INTERNAL;
    }
    catch (std::exception const& e)
    {
        gLastError = std::string("internal error: ") + e.what();
        return ALIGNER_ERROR_INTERNAL;
    }
    catch (...)
    {
        gLastError = "internal error";
        return ALIGNER_ERROR_INTERNAL;
    }
}

aligner_status invalid(char const* message)
{
    gLastError = message;
    return ALIGNER_ERROR_INVALID_ARGUMENT;
}
} // namespace

extern "C" {

const char* aligner_last_error(void)
{
    return gLastError.c_str();
}

const char* aligner_status_name(aligner_status status)
{
    switch (status)
    {
    case ALIGNER_OK: return "ALIGNER_OK";
    case ALIGNER_ERROR_INVALID_ARGUMENT: return "ALIGNER_ERROR_INVALID_ARGUMENT";
    case ALIGNER_ERROR_FILE: return "ALIGNER_ERROR_FILE";
    case ALIGNER_ERROR_MISMATCH: return "ALIGNER_ERROR_MISMATCH";
    case ALIGNER_ERROR_PLUGIN: return "ALIGNER_ERROR_PLUGIN";
    case ALIGNER_ERROR_TENSORRT: return "ALIGNER_ERROR_TENSORRT";
    case ALIGNER_ERROR_CUDA: return "ALIGNER_ERROR_CUDA";
    case ALIGNER_ERROR_CAPACITY: return "ALIGNER_ERROR_CAPACITY";
    case ALIGNER_ERROR_INTERNAL: return "ALIGNER_ERROR_INTERNAL";
    case ALIGNER_ERROR_SIGNATURE: return "ALIGNER_ERROR_SIGNATURE";
    }
    return "ALIGNER_ERROR_UNKNOWN";
}

const char* aligner_version(void)
{
    return ALIGNER_RUNTIME_VERSION;
}

aligner_status aligner_model_options_init(aligner_model_options* options)
{
    if (options == nullptr)
    {
        return invalid("aligner_model_options_init: options is NULL");
    }
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    return ALIGNER_OK;
}

aligner_status aligner_model_create(const aligner_model_options* options, aligner_model** model)
{
    if (options == nullptr || model == nullptr)
    {
        return invalid("aligner_model_create: options and model must not be NULL");
    }
    *model = nullptr;
    // A program built against version 2 passes the smaller struct of that version (runtimeInternal.h).
    if (options->struct_size < aligner::runtime::kModelOptionsV2Size || options->engine_path == nullptr
        || options->plugin_library_path == nullptr || options->export_dir == nullptr)
    {
        return invalid("aligner_model_create: set struct_size (aligner_model_options_init), engine_path, "
                       "plugin_library_path and export_dir");
    }
    return guarded([&] {
        auto created = std::make_unique<aligner_model>();
        aligner::runtime::createModel(*options, *created);
        *model = created.release();
    });
}

aligner_status aligner_model_destroy(aligner_model* model)
{
    delete model;
    return ALIGNER_OK;
}

aligner_status aligner_model_get_info(const aligner_model* model, aligner_model_info* info)
{
    if (model == nullptr || info == nullptr)
    {
        return invalid("aligner_model_get_info: model and info must not be NULL");
    }
    info->num_layers = model->numLayers;
    info->gate_layer = static_cast<int32_t>(model->manifest.gateLayer);
    info->num_steer_layers = static_cast<int32_t>(model->manifest.steerLayers.size());
    info->vocab_size = model->vocab;
    info->max_batch = model->maxBatch;
    info->max_sequence = model->maxContext;
    info->two_pass_prefill = model->manifest.twoPassPrefill ? 1 : 0;
    return ALIGNER_OK;
}

aligner_status aligner_generate_options_init(aligner_generate_options* options)
{
    if (options == nullptr)
    {
        return invalid("aligner_generate_options_init: options is NULL");
    }
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->max_new_tokens = 128;
    options->temperature = 1.0f;
    options->top_p = 1.0f;
    return ALIGNER_OK;
}

aligner_status aligner_generate(aligner_model* model, const int32_t* const* prompts, const int32_t* prompt_lengths,
    int32_t batch, const aligner_generate_options* options, aligner_result** result)
{
    if (model == nullptr || prompts == nullptr || prompt_lengths == nullptr || options == nullptr || result == nullptr)
    {
        return invalid("aligner_generate: model, prompts, prompt_lengths, options and result must not be NULL");
    }
    *result = nullptr;
    if (options->struct_size < sizeof(aligner_generate_options) || batch < 1 || options->max_new_tokens < 1
        || (options->num_stop_token_ids > 0 && options->stop_token_ids == nullptr) || options->num_stop_token_ids < 0)
    {
        return invalid("aligner_generate: need batch >= 1, max_new_tokens >= 1, initialised options and stop tokens");
    }
    if (options->do_sample
        && !(options->temperature > 0.0f && options->top_p > 0.0f && options->top_p <= 1.0f))
    {
        return invalid("aligner_generate: sampling needs temperature > 0 and top_p in (0, 1]");
    }
    return guarded([&] {
        auto out = std::make_unique<aligner_result>();
        aligner::runtime::generate(*model, prompts, prompt_lengths, batch, *options, *out);
        *result = out.release();
    });
}

aligner_status aligner_result_destroy(aligner_result* result)
{
    delete result;
    return ALIGNER_OK;
}

aligner_status aligner_result_num_sequences(const aligner_result* result, int32_t* count)
{
    if (result == nullptr || count == nullptr)
    {
        return invalid("aligner_result_num_sequences: result and count must not be NULL");
    }
    *count = static_cast<int32_t>(result->tokens.size());
    return ALIGNER_OK;
}

aligner_status aligner_result_tokens(const aligner_result* result, int32_t sequence, const int32_t** tokens, int32_t* length)
{
    if (result == nullptr || tokens == nullptr || length == nullptr || sequence < 0
        || sequence >= static_cast<int32_t>(result->tokens.size()))
    {
        return invalid("aligner_result_tokens: NULL argument or sequence out of range");
    }
    *tokens = result->tokens[sequence].data();
    *length = static_cast<int32_t>(result->tokens[sequence].size());
    return ALIGNER_OK;
}

aligner_status aligner_result_gate(const aligner_result* result, int32_t sequence, float* gate, float* score)
{
    if (result == nullptr || gate == nullptr || score == nullptr || sequence < 0
        || sequence >= static_cast<int32_t>(result->gate.size()))
    {
        return invalid("aligner_result_gate: NULL argument or sequence out of range");
    }
    *gate = result->gate[sequence];
    *score = result->score[sequence];
    return ALIGNER_OK;
}

aligner_status aligner_result_flags(const aligner_result* result, int32_t sequence, uint32_t* flags)
{
    if (result == nullptr || flags == nullptr || sequence < 0 || sequence >= static_cast<int32_t>(result->flags.size()))
    {
        return invalid("aligner_result_flags: NULL argument or sequence out of range");
    }
    *flags = result->flags[sequence];
    return ALIGNER_OK;
}

} // extern "C"
