// ctest: the C API's manifest helpers, which need neither TensorRT nor a GPU: SHA-256 against the FIPS 180-2 test
// vectors, and the top-level JSON value scanner on a manifest-shaped document.
#include "jsonScan.h"
#include "sha256.h"

#include <cstdio>
#include <string>
#include <vector>

int main()
{
    int failures = 0;
    auto check = [&](bool ok, char const* what) {
        if (!ok)
        {
            ++failures;
            std::printf("FAIL %s\n", what);
        }
    };
    check(aligner::sha256Hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
    check(aligner::sha256Hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256(abc)");
    std::string const twoBlocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check(aligner::sha256Hex(twoBlocks.data(), twoBlocks.size())
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "sha256(448-bit message)");
    std::string const million(1000000, 'a');
    check(aligner::sha256Hex(million.data(), million.size())
            == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        "sha256(a x 1e6)");

    std::string const manifest = R"({"format_version": 1, "validation": {"gate_layer": 99, "note": "\"steer_layers\": [7]"},
        "steer_layers": [3, 4,5], "gate_layer" : 12, "trt_version": "10.3.0.26", "empty": []})";
    int64_t gate = -1;
    std::vector<int64_t> layers;
    std::string version;
    check(aligner::jsonInt(manifest, "gate_layer", gate) && gate == 12, "top-level int, not the nested one");
    check(aligner::jsonIntArray(manifest, "steer_layers", layers) && layers == std::vector<int64_t>{3, 4, 5},
        "int array, not the one inside a string");
    check(aligner::jsonString(manifest, "trt_version", version) && version == "10.3.0.26", "string value");
    check(aligner::jsonIntArray(manifest, "empty", layers) && layers.empty(), "empty array");
    check(!aligner::jsonInt(manifest, "missing", gate), "missing key");
    check(!aligner::jsonString(manifest, "gate_layer", version), "type mismatch");
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
}
