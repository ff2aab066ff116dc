// libaligner_signature_check: the C runtime's signature check (signature.h) behind a C ABI, for ctypes
// (tests/test_capi_signatures.py). It is the function aligner_model_create calls before it reads anything else of the
// export, so the signed-export rules of the C API are tested on machines without TensorRT or a GPU.
#include "aligner_runtime.h"
#include "signature.h"
#include "steerContract.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

namespace
{
void copyMessage(std::string const& text, char* message, size_t capacity)
{
    if (message != nullptr && capacity > 0)
    {
        size_t const n = std::min(text.size(), capacity - 1);
        std::memcpy(message, text.data(), n);
        message[n] = '\0';
    }
}
} // namespace

extern "C" __attribute__((visibility("default"))) int32_t aligner_signature_check(const char* export_dir,
    const char* trusted_keys, const char* expect_sha256, char* message, size_t capacity)
{
    if (export_dir == nullptr)
    {
        copyMessage("export_dir is NULL", message, capacity);
        return ALIGNER_ERROR_INVALID_ARGUMENT;
    }
    try
    {
        std::string const path = std::string(export_dir) + "/" + aligner::contract::kManifestFile;
        std::ifstream in(path, std::ios::binary);
        if (!in)
        {
            copyMessage("export manifest not found or unreadable: " + path, message, capacity);
            return ALIGNER_ERROR_FILE;
        }
        std::string const text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        aligner::runtime::SignatureCheck const check
            = aligner::runtime::verifyExport(export_dir, text, trusted_keys, expect_sha256);
        copyMessage(check.state + ": " + check.detail, message, capacity);
        return ALIGNER_OK;
    }
    catch (aligner::runtime::SignatureError const& refused)
    {
        copyMessage(refused.what(), message, capacity);
        return refused.status;
    }
    catch (std::exception const& e)
    {
        copyMessage(std::string("internal error: ") + e.what(), message, capacity);
        return ALIGNER_ERROR_INTERNAL;
    }
}
