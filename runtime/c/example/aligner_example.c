/* Example: generate from token ids with the C API and print the gate. Compiles against aligner_runtime.h alone.
 * Usage: aligner_example ENGINE PLUGIN_LIBRARY EXPORT_DIR TOKEN_ID...  */
#include "aligner_runtime.h"

#include <stdio.h>
#include <stdlib.h>

static int32_t print_token(void* user_data, int32_t sequence, int32_t token_id)
{
    (void)user_data;
    printf("sequence %d: token %d\n", sequence, token_id);
    return 0;
}

static int fail(const char* what, aligner_status status)
{
    fprintf(stderr, "%s: %s: %s\n", what, aligner_status_name(status), aligner_last_error());
    return 1;
}

int main(int argc, char** argv)
{
    if (argc < 5)
    {
        fprintf(stderr, "usage: %s ENGINE PLUGIN_LIBRARY EXPORT_DIR TOKEN_ID...\n", argv[0]);
        return 2;
    }
    aligner_model_options model_options;
    aligner_model_options_init(&model_options);
    model_options.engine_path = argv[1];
    model_options.plugin_library_path = argv[2];
    model_options.export_dir = argv[3];
    /* Signed exports: with INFERALIGNER_TRUSTED_KEYS set (or /etc/inferaligner/trusted_keys/), only an export signed by
     * one of those keys loads; model_options.trusted_keys and .expect_sha256 name a key or pin a manifest here. */

    aligner_model* model = NULL;
    aligner_status status = aligner_model_create(&model_options, &model);
    if (status != ALIGNER_OK)
    {
        return fail("aligner_model_create", status);
    }

    int32_t length = argc - 4;
    int32_t* prompt = (int32_t*)malloc(sizeof(int32_t) * (size_t)length);
    for (int32_t i = 0; i < length; ++i)
    {
        prompt[i] = (int32_t)atoi(argv[4 + i]);
    }
    const int32_t* prompts[1] = {prompt};

    aligner_generate_options options;
    aligner_generate_options_init(&options);
    options.max_new_tokens = 32;
    options.on_token = print_token;

    aligner_result* result = NULL;
    status = aligner_generate(model, prompts, &length, 1, &options, &result);
    free(prompt);
    if (status != ALIGNER_OK)
    {
        aligner_model_destroy(model);
        return fail("aligner_generate", status);
    }
    float gate = 0.0f, score = 0.0f;
    uint32_t flags = 0;
    const int32_t* tokens = NULL;
    int32_t count = 0;
    aligner_result_gate(result, 0, &gate, &score);
    aligner_result_flags(result, 0, &flags);
    aligner_result_tokens(result, 0, &tokens, &count);
    printf("gate %.0f score %.4f new tokens %d%s\n", gate, score, count,
        (flags & ALIGNER_FLAG_NONFINITE_SCORE) ? " (the score was not finite, so the gate steered)" : "");
    aligner_result_destroy(result);
    aligner_model_destroy(model);
    return 0;
}
