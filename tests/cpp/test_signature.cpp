// ctest, host only (no TensorRT, no GPU): the C runtime's signature check (runtime/c/src/signature.h). Ed25519 against
// the RFC 8032 test vectors (an independent reference); base64; trusted-key loading (PEM, Ed25519 only, the caller's
// paths before $INFERALIGNER_TRUSTED_KEYS before the config directory); the refusals of checkExportSignature.
// Compatibility with what aligner_runtime/signing.py writes is tests/test_capi_signatures.py's (through ctypes).
#include "signature.h"

#include "sha256.h"

#include <openssl/evp.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace aligner::runtime;

namespace
{
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL %s\n", what.c_str());
    }
}

std::vector<uint8_t> hex(std::string const& text)
{
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < text.size(); i += 2)
    {
        out.push_back(static_cast<uint8_t>(std::stoi(text.substr(i, 2), nullptr, 16)));
    }
    return out;
}

std::string bytes(std::vector<uint8_t> const& data)
{
    return std::string(data.begin(), data.end());
}

// RFC 8032 section 7.1, TEST 1 and TEST 2.
std::string const kSecret1 = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
std::string const kPublic1 = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
std::string const kSignature1 = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e397"
                                "01cf9b46bd25bf5f0595bbe24655141438e7a100b";
std::string const kPublic2 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
std::string const kSignature2 = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f361"
                                "3d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";
// The two public keys as PEM SubjectPublicKeyInfo (what `aligner-export keygen` writes), and an X25519 key.
std::string const kPem1 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n"
                          "-----END PUBLIC KEY-----\n";
std::string const kPem2 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAPUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=\n"
                          "-----END PUBLIC KEY-----\n";
std::string const kPemX25519 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEAAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
                               "-----END PUBLIC KEY-----\n";

// The RFC 8032 TEST 1 secret key's signature of `message` (OpenSSL), base64.
std::string sign1(std::string const& message)
{
    std::vector<uint8_t> const secret = hex(kSecret1);
    EVP_PKEY* key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, secret.data(), secret.size());
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    unsigned char signature[64];
    size_t length = sizeof signature;
    EVP_DigestSignInit(ctx, nullptr, nullptr, nullptr, key);
    EVP_DigestSign(ctx, signature, &length, reinterpret_cast<unsigned char const*>(message.data()), message.size());
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
    static char const* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    for (size_t i = 0; i < length; i += 3)
    {
        uint32_t group = signature[i] << 16 | (i + 1 < length ? signature[i + 1] << 8 : 0)
            | (i + 2 < length ? signature[i + 2] : 0);
        out += alphabet[group >> 18 & 63];
        out += alphabet[group >> 12 & 63];
        out += i + 1 < length ? alphabet[group >> 6 & 63] : '=';
        out += i + 2 < length ? alphabet[group & 63] : '=';
    }
    return out;
}

void write(fs::path const& path, std::string const& text)
{
    std::ofstream(path, std::ios::binary) << text;
}

// The message of the refusal (and its status), or "" when accepted.
std::string refusal(std::function<void()> const& body, aligner_status* status = nullptr)
{
    try
    {
        body();
        return "";
    }
    catch (SignatureError const& e)
    {
        if (status != nullptr)
        {
            *status = e.status;
        }
        return e.what();
    }
}

bool mentions(std::string const& text, std::string const& needle)
{
    bool const found = text.find(needle) != std::string::npos;
    if (!found)
    {
        std::printf("  message was: '%s' (expected to mention '%s')\n", text.c_str(), needle.c_str());
    }
    return found;
}

void testEd25519()
{
    check(ed25519Verify(hex(kPublic1), hex(kSignature1), ""), "RFC 8032 TEST 1 verifies");
    check(ed25519Verify(hex(kPublic2), hex(kSignature2), bytes(hex("72"))), "RFC 8032 TEST 2 verifies");
    check(!ed25519Verify(hex(kPublic2), hex(kSignature2), bytes(hex("73"))), "another message does not");
    check(!ed25519Verify(hex(kPublic1), hex(kSignature2), bytes(hex("72"))), "another key does not");
    std::vector<uint8_t> flipped = hex(kSignature1);
    flipped[10] ^= 1;
    check(!ed25519Verify(hex(kPublic1), flipped, ""), "a flipped signature bit does not");
    check(!ed25519Verify(hex(kPublic1), std::vector<uint8_t>(63), ""), "a short signature does not");
}

void testBase64()
{
    std::vector<uint8_t> out;
    check(decodeBase64("", out) && out.empty(), "empty");
    check(decodeBase64("Zm9vYmFy", out) && bytes(out) == "foobar", "RFC 4648 foobar");
    check(decodeBase64("Zm9vYg==", out) && bytes(out) == "foob", "two pads");
    check(decodeBase64("Zm9vYmE=", out) && bytes(out) == "fooba", "one pad");
    for (char const* bad : {"Zm9", "Zm9v!mFy", "Zm==YmFy", "====", "Zm9vYmF y", "Zm9v\nYmFy"})
    {
        check(!decodeBase64(bad, out), std::string("refused: ") + bad);
    }
}

void testKeys(fs::path const& root)
{
    TrustedKey const key = parsePublicKey(kPem1, "k1.pub");
    check(key.publicKey == hex(kPublic1), "the raw key out of the PEM");
    check(key.keyId == aligner::sha256Hex(key.publicKey.data(), 32), "key id: sha256 of the raw key");
    check(mentions(refusal([] { parsePublicKey(kPemX25519, "x.pub"); }), "not an Ed25519 public key"), "X25519");
    check(mentions(refusal([] { parsePublicKey("hello", "h.pub"); }), "not a PEM public key"), "not PEM");

    fs::path const dir = root / "keys";
    fs::create_directories(dir);
    write(dir / "a.pub", kPem1);
    write(dir / "b.pub", kPem2);
    write(dir / "notes.txt", "not a key"); // only *.pub files of a directory are read
    ::unsetenv(kTrustedKeysEnv);
    ::setenv(kConfigDirEnv, (root / "no-config").c_str(), 1);
    check(loadTrustedKeys(nullptr).keys.empty(), "nothing configured: no keys");
    check(loadTrustedKeys("").keys.empty(), "an empty option is no option");
    TrustedKeys const both = loadTrustedKeys(dir.c_str());
    check(both.keys.size() == 2 && both.source == "given by the caller", "a directory of .pub files");
    std::string const twoFiles = (dir / "a.pub").string() + ":" + (dir / "b.pub").string();
    check(loadTrustedKeys(twoFiles.c_str()).keys.size() == 2, "files separated by ':'");
    aligner_status status = ALIGNER_OK;
    check(mentions(refusal([&] { loadTrustedKeys((root / "missing.pub").c_str()); }, &status), "trusted key not found")
            && status == ALIGNER_ERROR_FILE,
        "a missing key file");
    fs::create_directories(root / "empty");
    check(mentions(refusal([&] { loadTrustedKeys((root / "empty").c_str()); }), "holds no .pub file"), "empty dir");
    write(root / "big.pub", std::string(kMaxKeyBytes + 1, 'x'));
    check(mentions(refusal([&] { loadTrustedKeys((root / "big.pub").c_str()); }), "is over 16 KiB"), "size bound");

    ::setenv(kTrustedKeysEnv, (dir / "b.pub").c_str(), 1);
    TrustedKeys const env = loadTrustedKeys(nullptr);
    check(env.keys.size() == 1 && env.keys[0].publicKey == hex(kPublic2) && env.source == "$INFERALIGNER_TRUSTED_KEYS",
        "the environment variable");
    check(loadTrustedKeys((dir / "a.pub").c_str()).keys[0].publicKey == hex(kPublic1), "the caller's keys come first");
    ::unsetenv(kTrustedKeysEnv);
    fs::create_directories(root / "config" / kTrustedKeysSubdir);
    write(root / "config" / kTrustedKeysSubdir / "c.pub", kPem1);
    ::setenv(kConfigDirEnv, (root / "config").c_str(), 1);
    TrustedKeys const config = loadTrustedKeys(nullptr);
    check(config.keys.size() == 1 && config.source == (root / "config" / kTrustedKeysSubdir).string(),
        "the config directory's trusted_keys/");
    ::unsetenv(kConfigDirEnv);
}

void testCheck(fs::path const& root)
{
    fs::path const exportDir = root / "export";
    fs::create_directories(exportDir);
    std::string const manifest = "{\"format_version\": 2}\n";
    std::string const digest = aligner::sha256Hex(manifest.data(), manifest.size());
    TrustedKeys const none;
    TrustedKeys keys;
    keys.keys = {parsePublicKey(kPem1, (root / "keys" / "a.pub").string())};
    keys.source = "given by the caller";
    TrustedKeys other;
    other.keys = {parsePublicKey(kPem2, "b.pub")};
    other.source = "given by the caller";

    aligner_status status = ALIGNER_OK;
    check(checkExportSignature(exportDir.string(), digest, none, nullptr).state == "not required", "no key: unsigned");
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), digest, keys, nullptr); }, &status),
              "the export is not signed (inferaligner.sig missing) and trusted keys are configured")
            && status == ALIGNER_ERROR_SIGNATURE,
        "a key: unsigned is refused");
    check(checkExportSignature(exportDir.string(), digest, none, digest.c_str()).state == "not required", "pin ok");
    std::string upper = digest;
    for (char& c : upper)
    {
        c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    }
    upper = "  " + upper + "\n";
    check(refusal([&] { checkExportSignature(exportDir.string(), digest, none, upper.c_str()); }).empty(),
        "the pin ignores case and surrounding blanks");
    std::string const zeros(64, '0');
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), digest, none, zeros.c_str()); }, &status),
              "not the expected 0000000000000000")
            && status == ALIGNER_ERROR_SIGNATURE,
        "a wrong pin");
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), digest, none, "abc"); }, &status),
              "64 hex digits")
            && status == ALIGNER_ERROR_INVALID_ARGUMENT,
        "a pin that is not a digest");

    std::string const keyId = keys.keys[0].keyId;
    auto const record = [&](std::string const& body) { write(exportDir / kSignatureFile, body); };
    std::string const good = sign1(std::string(kSignatureDomainTag) + digest);
    auto const signature = [&](std::string const& id, std::string const& sha, std::string const& sig,
                               std::string const& format = "1", std::string const& algorithm = "\"ed25519\"") {
        return "{\"format\": " + format + ", \"algorithm\": " + algorithm + ", \"key_id\": \"" + id
            + "\", \"manifest_sha256\": \"" + sha + "\", \"signature\": \"" + sig + "\"}";
    };
    record(signature(keyId, digest, good));
    SignatureCheck const verified = checkExportSignature(exportDir.string(), digest, keys, nullptr);
    check(verified.state == "verified" && verified.keyId == keyId && mentions(verified.detail, "a.pub"), "verified");
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), digest, other, nullptr); }),
              "which is not among the trusted keys (given by the caller)"),
        "an unknown key");
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), zeros, keys, nullptr); }),
              "the signature is for another manifest"),
        "a changed manifest");
    std::string forged = good;
    forged[10] = forged[10] == 'A' ? 'B' : 'A';
    record(signature(keyId, digest, forged));
    check(mentions(refusal([&] { checkExportSignature(exportDir.string(), digest, keys, nullptr); }), "does not verify"),
        "a forged signature");
    struct Bad
    {
        std::string body;
        char const* message;
    };
    for (Bad const& bad : {Bad{signature(keyId, digest, "!!"), "not base64"},
             Bad{signature(keyId, digest, "AAAA"), "64 bytes"}, Bad{signature(keyId, digest, good, "2"), "format"},
             Bad{signature(keyId, digest, good, "true"), "format"},
             Bad{signature(keyId, digest, good, "1", "\"rsa\""), "algorithm"},
             Bad{signature(keyId.substr(1), digest, good), "'key_id' must be a sha256"},
             Bad{"[" + signature(keyId, digest, good) + "]", "not a JSON object"}, Bad{"{", "not valid JSON"},
             Bad{std::string(kMaxSignatureBytes + 1, ' '), "is over 16 KiB"}})
    {
        record(bad.body);
        std::string const message
            = refusal([&] { checkExportSignature(exportDir.string(), digest, keys, nullptr); }, &status);
        check(mentions(message, bad.message) && message.find('\n') == std::string::npos
                && status == ALIGNER_ERROR_SIGNATURE,
            std::string("a bad signature file: ") + bad.message);
        check(checkExportSignature(exportDir.string(), digest, none, nullptr).state == "not required",
            "without keys a bad signature file is not read");
    }
    record(signature(keyId, digest, good));
    check(mentions(refusal([&] { verifyExport(exportDir.string(), manifest + " ", (root / "keys" / "a.pub").c_str(),
                                     nullptr); }),
              "refusing " + exportDir.string() + ": the signature is for another manifest"),
        "verifyExport hashes the bytes it is given and names the export");
    check(verifyExport(exportDir.string(), manifest, (root / "keys" / "a.pub").c_str(), nullptr).state == "verified",
        "verifyExport");
}
} // namespace

int main()
{
    fs::path const root = fs::temp_directory_path() / ("aligner-test-signature-" + std::to_string(::getpid()));
    fs::remove_all(root);
    fs::create_directories(root);
    testEd25519();
    testBase64();
    testKeys(root);
    testCheck(root);
    fs::remove_all(root);
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
