// Signed exports on the C path (issue 21, docs/integrity.md "Signatures", docs/contract.md "Signature file"): the
// trusted Ed25519 keys (the caller's, else $INFERALIGNER_TRUSTED_KEYS, else the config directory's trusted_keys/) and
// the check of an export's inferaligner.sig against them, the same rules as aligner_runtime/signing.py. Host-only
// (OpenSSL libcrypto and nlohmann/json, no TensorRT), so ctest and tests/test_capi_signatures.py cover it without a
// GPU.
#pragma once

#include "aligner_runtime.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace aligner
{
namespace runtime
{

// The names and limits of aligner_runtime.signing (tests/test_contract_sync.py keeps them equal).
constexpr char const* kSignatureFile = "inferaligner.sig";
constexpr int64_t kSignatureFormat = 1;
constexpr char const* kSignatureAlgorithm = "ed25519";
constexpr char const* kSignatureDomainTag = "inferaligner-edge export signature 1\n";
constexpr char const* kTrustedKeysEnv = "INFERALIGNER_TRUSTED_KEYS";
constexpr char const* kConfigDirEnv = "INFERALIGNER_CONFIG_DIR";
constexpr char const* kDefaultConfigDir = "/etc/inferaligner";
constexpr char const* kTrustedKeysSubdir = "trusted_keys";
constexpr char const* kPublicKeySuffix = ".pub";
constexpr int64_t kMaxKeyBytes = 16384; // 16 KiB
constexpr int64_t kMaxSignatureBytes = 16384;
constexpr int64_t kMaxKeys = 1024;

// A refusal: one line, and the status the C API returns for it (ALIGNER_ERROR_SIGNATURE for an export that the
// configured keys or the pin do not accept; ALIGNER_ERROR_FILE for a trusted key that cannot be read or is not an
// Ed25519 public key; ALIGNER_ERROR_INVALID_ARGUMENT for an expect_sha256 that is not a digest).
struct SignatureError : std::runtime_error
{
    SignatureError(aligner_status s, std::string const& message)
        : std::runtime_error(message)
        , status(s)
    {
    }
    aligner_status status;
};

struct TrustedKey
{
    std::string keyId;             // sha256 of the raw 32-byte public key, lowercase hex
    std::vector<uint8_t> publicKey; // the raw 32 bytes
    std::string file;
};

struct TrustedKeys
{
    std::vector<TrustedKey> keys;
    std::string source; // where they came from, for messages
};

// The configured keys, first source found wins: `explicitPaths` (files or directories of *.pub, separated by ':';
// NULL or "" for none), else $INFERALIGNER_TRUSTED_KEYS (the same form), else $INFERALIGNER_CONFIG_DIR/trusted_keys/
// (default /etc/inferaligner/trusted_keys/) when that directory exists. Empty keys: none configured.
TrustedKeys loadTrustedKeys(char const* explicitPaths);

// One PEM SubjectPublicKeyInfo Ed25519 key (what `aligner-export keygen` writes as KEY.pub); `file` names it in
// messages.
TrustedKey parsePublicKey(std::string const& pem, std::string const& file);

// What the check found when it did not refuse.
struct SignatureCheck
{
    std::string state; // "verified" or "not required" (no key configured)
    std::string detail;
    std::string keyId;
};

// The checks of aligner_runtime.signing.check_export, in its order: the pin (`expectSha256`, NULL for none) against
// `manifestSha256`; then, when `keys` holds any key, the signature file of `exportDir`: present, well formed, made
// for this manifest, by a trusted key, verifying. Throws SignatureError; without keys nothing but the pin is required.
SignatureCheck checkExportSignature(std::string const& exportDir, std::string const& manifestSha256,
    TrustedKeys const& keys, char const* expectSha256);

// What aligner_model_create runs before anything else reads the export: the keys of `trustedKeys` (loadTrustedKeys)
// and checkExportSignature over the sha256 of `manifestText`, the manifest's bytes as read once for both the check and
// the parse. Refusals name the export: "refusing DIR: ...".
SignatureCheck verifyExport(std::string const& exportDir, std::string const& manifestText, char const* trustedKeys,
    char const* expectSha256);

// Ed25519 (RFC 8032) verification of `signature` (64 bytes) over `message` with a raw 32-byte public key.
bool ed25519Verify(std::vector<uint8_t> const& publicKey, std::vector<uint8_t> const& signature,
    std::string const& message);

// Strict base64 (RFC 4648 alphabet, '=' padding, length a multiple of 4); false on anything else.
bool decodeBase64(std::string const& text, std::vector<uint8_t>& out);

} // namespace runtime
} // namespace aligner
