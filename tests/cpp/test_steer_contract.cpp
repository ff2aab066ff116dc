// ctest, host only: the contract facts of plugins/common (steerContract.h), SHA-256 against the FIPS 180-2 test
// vectors, and the constants digest (steerDigest.h) against digests computed independently with Python's hashlib and
// struct from the canonical form of docs/contract.md "Integrity digests":
//
//   def digest(attrs):  # {name: ("f" | "i", values)}
//       out = b""
//       for name in sorted(attrs):
//           tag, values = attrs[name]
//           out += name.encode() + b"\0" + tag.encode() + struct.pack("<Q", len(values))
//           out += b"".join(struct.pack("<f" if tag == "f" else "<q", v) for v in values)
//       return hashlib.sha256(out).hexdigest()
#include "sha256.h"
#include "steerContract.h"
#include "steerDigest.h"

#include <cstdio>
#include <string>
#include <vector>

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

void testSha256()
{
    using aligner::sha256Hex;
    check(sha256Hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
    check(sha256Hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256(abc)");
    std::string const twoBlocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check(sha256Hex(twoBlocks.data(), twoBlocks.size())
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "sha256(448-bit message)");
    std::string const million(1000000, 'a');
    check(sha256Hex(million.data(), million.size())
            == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        "sha256(a x 1e6)");
}

void testConstantsDigest()
{
    // SteerShift: vector = [1, -2.5, 0.125].
    std::vector<float> const vector{1.0f, -2.5f, 0.125f};
    aligner::ConstantsDigest shift;
    shift.addFloats("vector", vector.data(), vector.size());
    check(shift.hex() == "69f4dda777635309aec90b8413590655b5779c987749d1f003350241300ed52a", "SteerShift digest");

    // SteerGate version 1: direction = [0.6, 0.8], bias = -0.25; added out of order, hashed in name order.
    std::vector<float> const direction{0.6f, 0.8f};
    float const bias1 = -0.25f;
    aligner::ConstantsDigest gate1;
    gate1.addFloats("direction", direction.data(), direction.size());
    gate1.addFloats("bias", &bias1, 1);
    check(gate1.hex() == "b0057596c32d442b0a130e9e40d267154855fa87ff9fe118f853a3c27c0983a7", "SteerGate v1 digest");

    // SteerGate version 2: weight = [0.5, -1, 2], bias = 0.75, tokens = 3, normalize = 1 (ints as int64).
    std::vector<float> const weight{0.5f, -1.0f, 2.0f};
    float const bias2 = 0.75f;
    aligner::ConstantsDigest gate2;
    gate2.addInt("tokens", 3);
    gate2.addFloats("weight", weight.data(), weight.size());
    gate2.addInt("normalize", 1);
    gate2.addFloats("bias", &bias2, 1);
    check(gate2.hex() == "66cebb332c45ba8f535373ef10ebb5ade244571eac75e6dfec51177c490e94e2", "SteerGate v2 digest");

    // The canonical bytes of one attribute, spelled out.
    aligner::ConstantsDigest one;
    one.addInt("k", 258);
    std::vector<unsigned char> const want{'k', 0x00, 'i', 1, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0};
    check(one.canonicalBytes() == want, "canonical bytes: name, NUL, tag, uint64 count, int64 values (little-endian)");

    // One flipped bit in a value changes the digest.
    std::vector<float> flipped = vector;
    flipped[1] = -2.4999998f;
    aligner::ConstantsDigest other;
    other.addFloats("vector", flipped.data(), flipped.size());
    check(other.hex() != shift.hex(), "a changed value changes the digest");
}

void testNodeNames()
{
    namespace c = aligner::contract;
    check(c::steerNodeName(12, c::kSteerGate) == "/model/layers.12/steer/SteerGate", "SteerGate node name");
    check(c::steerNodeName(0, c::kSteerShift) == "/model/layers.0/steer/SteerShift", "SteerShift node name");
    int64_t layer = -1;
    std::string op;
    check(c::parseSteerNodeName("/model/layers.7/steer/SteerShift", layer, op) && layer == 7 && op == "SteerShift",
        "parse a SteerShift name");
    check(c::parseSteerNodeName("/model/layers.0/steer/SteerGate", layer, op) && layer == 0 && op == "SteerGate",
        "parse a SteerGate name");
    for (char const* bad : {"/model/layers.7/steer/SteerShift/Add_3", "/model/layers.x/steer/SteerGate",
             "/model/layers./steer/SteerGate", "/model/layers.07/steer/SteerGate", "/model/layers.-1/steer/SteerGate",
             "/model/layers.3/steer/Steer", "/model/layers.3/mlp/SteerGate", "model/layers.3/steer/SteerGate",
             "/model/steer/ConstantOfShape", ""})
    {
        check(!c::parseSteerNodeName(bad, layer, op), std::string("not a steering node name: '") + bad + "'");
    }
    for (int64_t l : {0, 5, 31, 123456})
    {
        for (char const* o : {c::kSteerGate, c::kSteerShift})
        {
            check(c::parseSteerNodeName(c::steerNodeName(l, o), layer, op) && layer == l && op == o,
                "builder and parser agree");
        }
    }
    check(std::string(c::kDomain) == "inferaligner" && std::string(c::kPluginNamespace) == "inferaligner",
        "domain and namespace");
    check(std::string(c::kSteerGateVersion1) == "1" && std::string(c::kSteerGateVersion2) == "2"
            && std::string(c::kSteerGateVersion3) == "3" && std::string(c::kSteerShiftVersion1) == "1" && std::string(c::kSteerShiftVersion2) == "2",
        "plugin versions");
    check(std::string(c::kModelFile) == "model.onnx" && std::string(c::kManifestFile) == "inferaligner.json"
            && std::string(c::kEngineStampFile) == "ENGINE.json",
        "file names");
}
} // namespace

int main()
{
    testSha256();
    testConstantsDigest();
    testNodeNames();
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
