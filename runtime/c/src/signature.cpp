#include "signature.h"

#include "sha256.h"

#include <nlohmann/json.hpp>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>

namespace aligner
{
namespace runtime
{
namespace
{
namespace fs = std::filesystem;
using nlohmann::json;

constexpr char const* kEllipsis = "\xe2\x80\xa6"; // the Python messages' "…"

std::string shortHex(std::string const& hex)
{
    return hex.substr(0, 16) + kEllipsis;
}

bool isLowerHex64(std::string const& text)
{
    return text.size() == 64
        && std::all_of(
            text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// The file's bytes, refused over `limit` before reading (a key or signature file is a few hundred bytes).
std::string readSmall(fs::path const& path, int64_t limit, char const* what, aligner_status status)
{
    std::error_code error;
    auto const size = fs::file_size(path, error);
    if (error)
    {
        throw SignatureError(status, std::string("cannot read ") + what + " " + path.string() + ": " + error.message());
    }
    if (size > static_cast<uintmax_t>(limit))
    {
        throw SignatureError(status, std::string(what) + " " + path.string() + " is over "
                + std::to_string(limit >> 10) + " KiB");
    }
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        throw SignatureError(status, std::string("cannot read ") + what + " " + path.string() + ": "
                + std::strerror(errno));
    }
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad())
    {
        throw SignatureError(status, std::string("cannot read ") + what + " " + path.string());
    }
    return content;
}

struct PkeyFree
{
    void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
struct BioFree
{
    void operator()(BIO* bio) const { BIO_free(bio); }
};
struct MdCtxFree
{
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

std::unique_ptr<EVP_PKEY, PkeyFree> rawPublicKey(std::vector<uint8_t> const& raw)
{
    return std::unique_ptr<EVP_PKEY, PkeyFree>(
        EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, raw.data(), raw.size()));
}

// The entries of one configured path: a directory's *.pub files (sorted), or the file itself.
std::vector<fs::path> keyFiles(fs::path const& entry, std::string const& source)
{
    std::error_code error;
    if (fs::is_directory(entry, error))
    {
        std::vector<fs::path> files;
        fs::directory_iterator it(entry, error);
        if (error)
        {
            throw SignatureError(ALIGNER_ERROR_FILE, "cannot read the trusted keys " + entry.string() + " (" + source
                    + "): " + error.message());
        }
        for (; it != fs::directory_iterator(); it.increment(error))
        {
            if (error)
            {
                break;
            }
            std::error_code ignored;
            if (it->path().extension() == kPublicKeySuffix && fs::is_regular_file(it->path(), ignored))
            {
                files.push_back(it->path());
            }
        }
        std::sort(files.begin(), files.end());
        if (files.empty())
        {
            throw SignatureError(ALIGNER_ERROR_FILE, "the trusted key directory " + entry.string() + " (" + source
                    + ") holds no " + kPublicKeySuffix + " file");
        }
        return files;
    }
    if (fs::is_regular_file(entry, error))
    {
        return {entry};
    }
    throw SignatureError(ALIGNER_ERROR_FILE, "trusted key not found: " + entry.string() + " (" + source + ")");
}

std::vector<std::string> splitPaths(std::string const& text)
{
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= text.size())
    {
        size_t const colon = std::min(text.find(':', start), text.size());
        if (colon > start)
        {
            out.push_back(text.substr(start, colon - start));
        }
        start = colon + 1;
    }
    return out;
}

std::string const& requiredString(json const& record, char const* key, std::string const& where)
{
    auto const found = record.find(key);
    if (found == record.end())
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": '" + key + "' is missing");
    }
    if (!found->is_string())
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": '" + key + "' must be a string");
    }
    return found->get_ref<std::string const&>();
}

struct SignatureRecord
{
    std::string keyId;
    std::string manifestSha256;
    std::vector<uint8_t> signature;
};

// aligner_runtime.signing.read_signature: the record's kinds checked.
SignatureRecord readSignature(fs::path const& file)
{
    std::string const where = "the signature " + file.string();
    std::string const text = readSmall(file, kMaxSignatureBytes, "signature", ALIGNER_ERROR_SIGNATURE);
    json record;
    try
    {
        record = json::parse(text);
    }
    catch (json::exception const& e)
    {
        std::string reason = e.what();
        reason = reason.substr(0, std::min<size_t>(reason.find('\n'), 80));
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": not valid JSON (" + reason + ")");
    }
    if (!record.is_object())
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + " is not a JSON object");
    }
    auto const format = record.find("format");
    if (format == record.end())
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": 'format' is missing");
    }
    if (!format->is_number_integer() || format->get<int64_t>() != kSignatureFormat)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + " has format " + format->dump().substr(0, 20)
                + "; this runtime reads " + std::to_string(kSignatureFormat));
    }
    if (requiredString(record, "algorithm", where) != kSignatureAlgorithm)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": 'algorithm' must be one of " + kSignatureAlgorithm);
    }
    SignatureRecord out;
    for (auto const& [key, target] : {std::pair<char const*, std::string*>{"key_id", &out.keyId},
             std::pair<char const*, std::string*>{"manifest_sha256", &out.manifestSha256}})
    {
        *target = requiredString(record, key, where);
        if (!isLowerHex64(*target))
        {
            throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": '" + key
                    + "' must be a sha256 digest (64 lowercase hex digits)");
        }
    }
    if (!decodeBase64(requiredString(record, "signature", where), out.signature))
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": 'signature' is not base64");
    }
    if (out.signature.size() != 64)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, where + ": 'signature' is not an Ed25519 signature (64 bytes)");
    }
    return out;
}

void checkPin(char const* expectSha256, std::string const& digest)
{
    if (expectSha256 == nullptr)
    {
        return;
    }
    std::string wanted = expectSha256;
    auto const notSpace = [](unsigned char c) { return !std::isspace(c); };
    wanted.erase(wanted.begin(), std::find_if(wanted.begin(), wanted.end(), notSpace));
    wanted.erase(std::find_if(wanted.rbegin(), wanted.rend(), notSpace).base(), wanted.end());
    std::transform(wanted.begin(), wanted.end(), wanted.begin(), [](unsigned char c) { return std::tolower(c); });
    if (!isLowerHex64(wanted))
    {
        throw SignatureError(ALIGNER_ERROR_INVALID_ARGUMENT, "expect_sha256 must be a sha256 digest (64 hex digits)");
    }
    if (wanted != digest)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, "the manifest's sha256 is " + shortHex(digest)
                + ", not the expected " + shortHex(wanted) + " (another export, or a changed one)");
    }
}
} // namespace

bool decodeBase64(std::string const& text, std::vector<uint8_t>& out)
{
    out.clear();
    if (text.size() % 4 != 0)
    {
        return false;
    }
    auto const value = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        if (c == '+') return 62;
        if (c == '/') return 63;
        return -1;
    };
    for (size_t i = 0; i < text.size(); i += 4)
    {
        bool const last = i + 4 == text.size();
        int const pad = last ? (text[i + 3] == '=') + (text[i + 2] == '=' && text[i + 3] == '=') : 0;
        uint32_t group = 0;
        for (size_t j = 0; j < 4; ++j)
        {
            int const v = j >= 4 - static_cast<size_t>(pad) ? 0 : value(text[i + j]);
            if (v < 0)
            {
                return false;
            }
            group = group << 6 | static_cast<uint32_t>(v);
        }
        out.push_back(static_cast<uint8_t>(group >> 16));
        if (pad < 2)
        {
            out.push_back(static_cast<uint8_t>(group >> 8));
        }
        if (pad < 1)
        {
            out.push_back(static_cast<uint8_t>(group));
        }
    }
    return true;
}

bool ed25519Verify(std::vector<uint8_t> const& publicKey, std::vector<uint8_t> const& signature,
    std::string const& message)
{
    if (publicKey.size() != 32 || signature.size() != 64)
    {
        return false;
    }
    auto const key = rawPublicKey(publicKey);
    std::unique_ptr<EVP_MD_CTX, MdCtxFree> const ctx(EVP_MD_CTX_new());
    if (!key || !ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key.get()) != 1)
    {
        return false;
    }
    return EVP_DigestVerify(ctx.get(), signature.data(), signature.size(),
               reinterpret_cast<unsigned char const*>(message.data()), message.size())
        == 1;
}

TrustedKey parsePublicKey(std::string const& pem, std::string const& file)
{
    std::unique_ptr<BIO, BioFree> const bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    std::unique_ptr<EVP_PKEY, PkeyFree> const key(
        bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr);
    if (!key)
    {
        throw SignatureError(ALIGNER_ERROR_FILE, "trusted key " + file + ": not a PEM public key");
    }
    if (EVP_PKEY_id(key.get()) != EVP_PKEY_ED25519)
    {
        throw SignatureError(ALIGNER_ERROR_FILE, "trusted key " + file + ": not an Ed25519 public key");
    }
    TrustedKey out;
    out.publicKey.resize(32);
    size_t length = out.publicKey.size();
    if (EVP_PKEY_get_raw_public_key(key.get(), out.publicKey.data(), &length) != 1 || length != 32)
    {
        throw SignatureError(ALIGNER_ERROR_FILE, "trusted key " + file + ": not an Ed25519 public key");
    }
    out.keyId = sha256Hex(out.publicKey.data(), out.publicKey.size());
    out.file = file;
    return out;
}

TrustedKeys loadTrustedKeys(char const* explicitPaths)
{
    std::vector<std::string> entries;
    TrustedKeys keys;
    char const* fromEnv = std::getenv(kTrustedKeysEnv);
    if (explicitPaths != nullptr && *explicitPaths != '\0')
    {
        entries = splitPaths(explicitPaths);
        keys.source = "given by the caller";
    }
    else if (fromEnv != nullptr && *fromEnv != '\0')
    {
        entries = splitPaths(fromEnv);
        keys.source = std::string("$") + kTrustedKeysEnv;
    }
    else
    {
        char const* configured = std::getenv(kConfigDirEnv);
        bool const set = configured != nullptr && *configured != '\0';
        fs::path const directory = fs::path(set ? configured : kDefaultConfigDir) / kTrustedKeysSubdir;
        std::error_code error;
        if (!fs::is_directory(directory, error))
        {
            keys.source = "none configured";
            return keys;
        }
        entries = {directory.string()};
        keys.source = directory.string();
    }
    for (std::string const& entry : entries)
    {
        for (fs::path const& file : keyFiles(entry, keys.source))
        {
            if (static_cast<int64_t>(keys.keys.size()) >= kMaxKeys)
            {
                throw SignatureError(ALIGNER_ERROR_FILE, "more than " + std::to_string(kMaxKeys) + " trusted keys ("
                        + keys.source + ")");
            }
            TrustedKey key = parsePublicKey(readSmall(file, kMaxKeyBytes, "trusted key", ALIGNER_ERROR_FILE),
                file.string());
            // the same key twice (a file named twice, a copy): one entry, the first file, as Python's dict keeps it
            auto const same = std::find_if(keys.keys.begin(), keys.keys.end(),
                [&](TrustedKey const& k) { return k.keyId == key.keyId; });
            if (same == keys.keys.end())
            {
                keys.keys.push_back(std::move(key));
            }
            else
            {
                same->file = key.file;
            }
        }
    }
    return keys;
}

SignatureCheck checkExportSignature(std::string const& exportDir, std::string const& manifestSha256,
    TrustedKeys const& keys, char const* expectSha256)
{
    checkPin(expectSha256, manifestSha256);
    fs::path const file = fs::path(exportDir) / kSignatureFile;
    std::error_code error;
    bool const present = fs::exists(file, error);
    if (keys.keys.empty())
    {
        return {"not required", std::string("no trusted key configured; the export is ")
                + (present ? "signed (not verified)" : "unsigned"), ""};
    }
    if (!present)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, std::string("the export is not signed (") + kSignatureFile
                + " missing) and trusted keys are configured (" + keys.source + ")");
    }
    SignatureRecord const record = readSignature(file);
    if (record.manifestSha256 != manifestSha256)
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, "the signature is for another manifest (sha256 "
                + shortHex(record.manifestSha256) + ", this one is " + shortHex(manifestSha256)
                + "): the manifest was changed after signing");
    }
    auto const key = std::find_if(keys.keys.begin(), keys.keys.end(),
        [&](TrustedKey const& k) { return k.keyId == record.keyId; });
    if (key == keys.keys.end())
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, "the export is signed by key " + shortHex(record.keyId)
                + ", which is not among the trusted keys (" + keys.source + ")");
    }
    std::string const name = fs::path(key->file).filename().string();
    if (!ed25519Verify(key->publicKey, record.signature, std::string(kSignatureDomainTag) + manifestSha256))
    {
        throw SignatureError(ALIGNER_ERROR_SIGNATURE, "the export's signature does not verify with the trusted key "
                + name + " (forged or corrupted signature)");
    }
    return {"verified", "signed by trusted key " + name + " (" + shortHex(record.keyId) + ")", record.keyId};
}

SignatureCheck verifyExport(std::string const& exportDir, std::string const& manifestText, char const* trustedKeys,
    char const* expectSha256)
{
    try
    {
        TrustedKeys const keys = loadTrustedKeys(trustedKeys);
        return checkExportSignature(exportDir, sha256Hex(manifestText.data(), manifestText.size()), keys, expectSha256);
    }
    catch (SignatureError const& refused)
    {
        throw SignatureError(refused.status, "refusing " + exportDir + ": " + refused.what());
    }
}

} // namespace runtime
} // namespace aligner
