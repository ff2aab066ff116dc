// ctest, host only (no TensorRT, no GPU): the C runtime's reading of the manifest (formats 2 and 3) and of the ENGINE.json
// stamp, the comparison of the plugin library's constants digests with the manifest's integrity.constants, and the
// protocol's host-side rules (position ids of a padded batch, the gate kept after the scoring prefill, row flags).
#include "aligner_runtime.h"
#include "manifest.h"
#include "protocol.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

using aligner::runtime::Manifest;
using aligner::runtime::ManifestError;
using aligner::runtime::PluginDigest;
using nlohmann::json;

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

std::string const kGateDigest(64, 'a');
std::string const kShiftDigest3(64, 'b');
std::string const kShiftDigest5(64, 'c');
std::string const kGateNode = "/model/layers.4/steer/SteerGate";
std::string const kShift3 = "/model/layers.3/steer/SteerShift";
std::string const kShift5 = "/model/layers.5/steer/SteerShift";

// A format-2 manifest as aligner-export wrote it before issue 19, with keys the C runtime does not read.
json goodManifest()
{
    return json{{"format_version", 2}, {"package_version", "0.2.0"},
        {"steering_io", {{"gate_in", "steer_gate_in"}, {"gate", "steer_gate"}, {"score", "steer_score"}}},
        {"two_pass_prefill", true},
        {"gate", {{"version", 2}, {"layers", {2, 4}}, {"tokens", 3}, {"normalize", true}, {"bias", -0.5}}},
        {"gate_layer", 4}, {"steer_layers", {5, 3}}, {"alpha", 4.0},
        {"integrity",
            {{"constants",
                 {{kGateNode, kGateDigest}, {"/model/layers.2/steer/SteerGate", std::string(64, 'd')},
                     {kShift3, kShiftDigest3}, {kShift5, kShiftDigest5}}},
                {"functions", {{"SteerGate", std::string(64, 'e')}}}}}};
}

// The same export as aligner-export writes it now (format 3): the gate's last layer, bias and rule only in "gate".
json format3Manifest()
{
    json m = goodManifest();
    m["format_version"] = 3;
    m.erase("gate_layer");
    m["gate"]["rule"] = "linear";
    return m;
}

// The message of the refusal, or "" when the manifest was accepted.
std::string refusal(json const& manifest)
{
    try
    {
        aligner::runtime::parseManifest(manifest.dump(), "x/inferaligner.json");
        return "";
    }
    catch (ManifestError const& e)
    {
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

void testGoodManifest()
{
    Manifest const m = aligner::runtime::parseManifest(goodManifest().dump(2), "x/inferaligner.json");
    check(m.formatVersion == 2, "format_version");
    check(m.io.gateIn == "steer_gate_in" && m.io.gate == "steer_gate" && m.io.score == "steer_score", "steering_io");
    check(m.twoPassPrefill, "two_pass_prefill");
    check(m.gateLayers == std::vector<int64_t>{2, 4} && m.gateLayer == 4, "gate.layers and gate_layer");
    check(m.steerLayers == std::vector<int64_t>{3, 5}, "steer_layers, sorted");
    check(m.constantDigests.size() == 4 && m.constantDigests.at(kShift5) == kShiftDigest5, "integrity.constants");
    json renamed = goodManifest();
    renamed["steering_io"]["gate"] = "gate_out";
    renamed["two_pass_prefill"] = false;
    Manifest const r = aligner::runtime::parseManifest(renamed.dump(), "x");
    check(r.io.gate == "gate_out" && !r.twoPassPrefill, "I/O names and the two-pass rule come from the manifest");
    check(m.strengthHalfLife == 0.0, "no strength schedule: the constant shift");
    json decaying = goodManifest();
    decaying["strength"] = {{"half_life", 12.0}, {"floor", 0.25}};
    Manifest const d = aligner::runtime::parseManifest(decaying.dump(), "x");
    check(d.strengthHalfLife == 12.0 && d.strengthFloor == 0.25, "the strength schedule is read");
    decaying["strength"] = {{"half_life", -1.0}, {"floor", 0.25}};
    check(mentions(refusal(decaying), "'strength'"), "a bad strength schedule is refused");
    check(m.endRuleAfter == -1, "no end rule");
    json ending = goodManifest();
    ending["end_rule"] = {{"after", 8}, {"slope", 1.5}};
    ending["eos_token_ids"] = {2, 7};
    Manifest const e = aligner::runtime::parseManifest(ending.dump(), "x");
    check(e.endRuleAfter == 8 && e.endRuleSlope == 1.5 && e.eosTokenIds == std::vector<int64_t>{2, 7},
        "the end rule and its end tokens are read");
    ending["end_rule"] = {{"after", 8}, {"slope", 0.0}};
    check(mentions(refusal(ending), "'end_rule'"), "an end rule with slope 0 is refused");
    ending["end_rule"] = {{"after", 8.5}, {"slope", 1.0}};
    check(mentions(refusal(ending), "'end_rule'"), "a fractional end rule 'after' is refused");
    check(m.gateVersion == 2, "gate.version is read");
    json pooled = goodManifest();
    pooled["gate"]["version"] = 3;
    check(aligner::runtime::parseManifest(pooled.dump(), "x").gateVersion == 3, "gate.version 3 (the pooled gate)");
    pooled["gate"]["version"] = 4;
    check(mentions(refusal(pooled), "'gate.version'"), "an unknown gate.version is refused");
    pooled["gate"].erase("version");
    check(mentions(refusal(pooled), "'gate.version'"), "a missing gate.version is refused");
    check(m.shiftVersion == 1, "no shift_mode: SteerShift version 1 (add)");
    json shifting = goodManifest();
    shifting["shift_mode"] = "norm";
    check(aligner::runtime::parseManifest(shifting.dump(), "x").shiftVersion == 2, "shift_mode norm: version 2");
    shifting["shift_mode"] = "add";
    check(aligner::runtime::parseManifest(shifting.dump(), "x").shiftVersion == 1, "shift_mode add: version 1");
    shifting["shift_mode"] = "scale";
    check(mentions(refusal(shifting), "'shift_mode'"), "an unknown shift_mode is refused");
    shifting["shift_mode"] = 2;
    check(mentions(refusal(shifting), "'shift_mode'"), "a shift_mode that is not a string is refused");
}

void testFormat3()
{
    Manifest const m = aligner::runtime::parseManifest(format3Manifest().dump(2), "x/inferaligner.json");
    check(m.formatVersion == 3, "format 3 is read");
    check(m.gateLayers == std::vector<int64_t>{2, 4} && m.gateLayer == 4, "format 3: g* is the last of gate.layers");
    check(m.steerLayers == std::vector<int64_t>{3, 5} && m.constantDigests.size() == 4, "format 3: the rest as before");
    for (char const* duplicate : {"gate_layer", "bias", "bias_rule"})
    {
        json m3 = format3Manifest();
        m3[duplicate] = duplicate == std::string("bias_rule") ? json("fpr") : json(4);
        check(mentions(refusal(m3), std::string("'") + duplicate + "'"),
            std::string("format 3 with the duplicate ") + duplicate + " is refused");
    }
    json noLayers = format3Manifest();
    noLayers["gate"].erase("layers");
    check(mentions(refusal(noLayers), "'gate.layers'"), "format 3 without gate.layers is refused");
}

void testRefusals()
{
    // Each missing key is a refusal naming it.
    struct Removal
    {
        std::vector<std::string> path;
        std::string named;
    };
    std::vector<Removal> const removals{{{"format_version"}, "'format_version'"}, {{"steering_io"}, "'steering_io'"},
        {{"steering_io", "gate_in"}, "'steering_io.gate_in'"}, {{"steering_io", "gate"}, "'steering_io.gate'"},
        {{"steering_io", "score"}, "'steering_io.score'"}, {{"two_pass_prefill"}, "'two_pass_prefill'"},
        {{"gate"}, "'gate'"}, {{"gate", "layers"}, "'gate.layers'"}, {{"gate_layer"}, "'gate_layer'"},
        {{"steer_layers"}, "'steer_layers'"}, {{"integrity"}, "'integrity'"},
        {{"integrity", "constants"}, "'integrity.constants'"}, {{"integrity", "constants", kShift3}, kShift3}};
    for (Removal const& removal : removals)
    {
        json m = goodManifest();
        json* parent = &m;
        for (size_t i = 0; i + 1 < removal.path.size(); ++i)
        {
            parent = &(*parent)[removal.path[i]];
        }
        parent->erase(removal.path.back());
        std::string const message = refusal(m);
        check(!message.empty() && mentions(message, removal.named), "missing " + removal.named + " is refused");
    }

    json format1 = goodManifest();
    format1["format_version"] = 1;
    std::string const old = refusal(format1);
    check(mentions(old, "format_version 1") && mentions(old, "re-export with inferaligner-edge ≥ 0.2"),
        "format 1 is refused with the advice to re-export");
    json format1Bare = json{{"format_version", 1}, {"gate_layer", 4}, {"steer_layers", {3}}};
    check(mentions(refusal(format1Bare), "re-export"), "a format-1 manifest is told to re-export, not a missing key");
    json format4 = format3Manifest();
    format4["format_version"] = 4;
    check(mentions(refusal(format4), "format_version 4") && mentions(refusal(format4), "formats 2 to 3"),
        "format 4 is refused");

    struct Mutation
    {
        char const* what;
        void (*apply)(json&);
        char const* named;
    };
    std::vector<Mutation> const mutations{
        {"format_version as a string", [](json& m) { m["format_version"] = "2"; }, "'format_version'"},
        {"two_pass_prefill as 1", [](json& m) { m["two_pass_prefill"] = 1; }, "'two_pass_prefill'"},
        {"empty steering_io.gate", [](json& m) { m["steering_io"]["gate"] = ""; }, "'steering_io.gate'"},
        {"gate_layer not the last gate layer", [](json& m) { m["gate_layer"] = 2; }, "gate_layer 2"},
        {"empty gate.layers", [](json& m) { m["gate"]["layers"] = json::array(); }, "'gate.layers'"},
        {"negative steer layer", [](json& m) { m["steer_layers"] = {3, -5}; }, "'steer_layers'"},
        {"repeated steer layer", [](json& m) { m["steer_layers"] = {3, 3, 5}; }, "repeats"},
        {"digest not hex", [](json& m) { m["integrity"]["constants"][kShift3] = std::string(64, 'G'); }, kShift3.c_str()},
        {"digest in upper case", [](json& m) { m["integrity"]["constants"][kShift3] = std::string(64, 'B'); }, kShift3.c_str()},
        {"digest of a node not placed",
            [](json& m) { m["integrity"]["constants"]["/model/layers.9/steer/SteerShift"] = std::string(64, 'f'); },
            "/model/layers.9/steer/SteerShift"},
        {"digest of something else", [](json& m) { m["integrity"]["constants"]["/model/steer/ConstantOfShape"] = std::string(64, 'f'); },
            "/model/steer/ConstantOfShape"},
        {"a steer layer without its digest", [](json& m) { m["steer_layers"] = {3, 5, 6}; },
            "/model/layers.6/steer/SteerShift"},
    };
    for (Mutation const& mutation : mutations)
    {
        json m = goodManifest();
        mutation.apply(m);
        std::string const message = refusal(m);
        check(!message.empty() && mentions(message, mutation.named), std::string("refused: ") + mutation.what);
    }
    check(mentions(refusal(json::array()), "not a JSON object"), "a JSON array is refused");
    try
    {
        aligner::runtime::parseManifest("{\"format_version\": 2,", "x/inferaligner.json");
        check(false, "truncated JSON is refused");
    }
    catch (ManifestError const& e)
    {
        check(mentions(e.what(), "not valid JSON"), "truncated JSON is refused as invalid JSON");
    }
}

void testStamp()
{
    json const stamp{{"format_version", 1}, {"trt_version", "10.3.0.26"}, {"compute_capability", "8.7"},
        {"manifest_sha256", std::string(64, '1')}, {"engine_sha256", std::string(64, '2')}, {"precision", "fp16"}};
    auto const parsed = aligner::runtime::parseEngineStamp(stamp.dump(), "e/ENGINE.json");
    check(parsed.trtVersion == "10.3.0.26" && parsed.computeCapability == "8.7"
            && parsed.manifestSha256 == std::string(64, '1') && parsed.engineSha256 == std::string(64, '2'),
        "stamp fields");
    for (char const* key : {"trt_version", "compute_capability", "manifest_sha256", "engine_sha256"})
    {
        json without = stamp;
        without.erase(key);
        try
        {
            aligner::runtime::parseEngineStamp(without.dump(), "e/ENGINE.json");
            check(false, std::string("a stamp without ") + key + " is refused");
        }
        catch (ManifestError const& e)
        {
            check(mentions(e.what(), std::string("'") + key + "'"), std::string("stamp refusal names ") + key);
        }
    }
}

void testDigestComparison()
{
    Manifest const m = aligner::runtime::parseManifest(goodManifest().dump(), "x");
    std::vector<PluginDigest> const good{{"/model/layers.2/steer/SteerGate", "SteerGate", "2", std::string(64, 'd')},
        {kGateNode, "SteerGate", "2", kGateDigest}, {kShift3, "SteerShift", "1", kShiftDigest3},
        {kShift5, "SteerShift", "1", kShiftDigest5}};
    check(aligner::runtime::compareConstantDigests(m, good).empty(), "a matching registry is accepted");
    std::vector<PluginDigest> twice = good;
    twice.push_back(good[2]);
    check(aligner::runtime::compareConstantDigests(m, twice).empty(), "a node created twice with its digest is fine");

    std::vector<PluginDigest> changed = good;
    changed[3].hex = std::string(64, '0');
    std::string message = aligner::runtime::compareConstantDigests(m, changed);
    check(mentions(message, kShift5) && mentions(message, "differ"), "a digest mismatch names the node");

    std::vector<PluginDigest> missing(good.begin(), good.end() - 1);
    message = aligner::runtime::compareConstantDigests(m, missing);
    check(mentions(message, kShift5) && mentions(message, "no steering plugin"), "a missing node is named");

    std::vector<PluginDigest> extra = good;
    extra.push_back({"/model/layers.7/steer/SteerShift", "SteerShift", "1", std::string(64, 'b')});
    message = aligner::runtime::compareConstantDigests(m, extra);
    check(mentions(message, "/model/layers.7/steer/SteerShift") && mentions(message, "does not list"),
        "an unexpected steering plugin is named");

    std::vector<PluginDigest> wrongOp = good;
    wrongOp[2].op = "SteerGate";
    message = aligner::runtime::compareConstantDigests(m, wrongOp);
    check(mentions(message, kShift3), "a node that became another op is named");

    check(!aligner::runtime::compareConstantDigests(m, {}).empty(), "an empty registry is refused");
}

void testPositionIds()
{
    // Left padding: [0 0 1 1 1], [1 1 1 1 1], [0 0 0 0 1]; then a decode step.
    std::vector<int64_t> const mask{0, 0, 1, 1, 1, /**/ 1, 1, 1, 1, 1, /**/ 0, 0, 0, 0, 1};
    std::vector<int64_t> out(15, -7);
    aligner::runtime::positionIdsForCall(mask.data(), 3, 5, 5, out.data());
    // aligner_runtime.contract.position_ids: where(mask == 1, cumsum(mask) - 1, 1).
    std::vector<int64_t> want(15);
    for (int b = 0; b < 3; ++b)
    {
        int64_t sum = 0;
        for (int t = 0; t < 5; ++t)
        {
            sum += mask[b * 5 + t];
            want[b * 5 + t] = mask[b * 5 + t] == 1 ? sum - 1 : 1;
        }
    }
    check(out == want, "prefill position ids follow contract.position_ids");
    check(out == std::vector<int64_t>{1, 1, 0, 1, 2, 0, 1, 2, 3, 4, 1, 1, 1, 1, 0}, "prefill position ids, spelled out");
    // A decode step: mask [B, T = 6] with the new column, S = 1.
    std::vector<int64_t> const step{0, 0, 1, 1, 1, 1, /**/ 1, 1, 1, 1, 1, 1, /**/ 0, 0, 0, 0, 1, 1};
    std::vector<int64_t> one(3, -7);
    aligner::runtime::positionIdsForCall(step.data(), 3, 6, 1, one.data());
    check(one == std::vector<int64_t>{3, 5, 1}, "decode-step position ids");
}

void testPrefillGate()
{
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    using aligner::runtime::prefillGate;
    using aligner::runtime::rowFlags;
    check(prefillGate(0.0f, -1.0f) == 0.0f && prefillGate(1.0f, 2.0f) == 1.0f, "finite scores keep the graph's gate");
    using aligner::runtime::strengthAt;
    check(strengthAt(0.0, 0.0, 7) == 1.0f && strengthAt(8.0, 0.2, 0) == 1.0f, "constant strength; the prompt at 1");
    check(std::fabs(strengthAt(8.0, 0.0, 8) - 0.5f) < 1e-6f && std::fabs(strengthAt(8.0, 0.2, 16) - 0.4f) < 1e-6f,
        "decay: one half-life halves, the floor holds (as aligner_runtime.contract.StrengthSchedule)");
    using aligner::runtime::endBonus;
    // The values of aligner_runtime.contract.EndRule(after=8, slope=0.7).bonus (tests/test_end_rule.py pins them too).
    check(endBonus(-1, 1.0, 50) == 0.0f && endBonus(8, 0.7, 8) == 0.0f && endBonus(8, 0.7, 0) == 0.0f,
        "no bonus without a rule or before 'after'");
    check(endBonus(8, 0.7, 9) == 0.7f && endBonus(8, 0.7, 20) == 0.7f * 12.0f, "the bonus grows by slope per token");
    check(prefillGate(0.0f, nan) == 1.0f && prefillGate(1.0f, nan) == 1.0f, "a NaN score steers");
    check(prefillGate(0.0f, inf) == 1.0f && prefillGate(0.0f, -inf) == 1.0f, "an infinite score steers");
    check(prefillGate(nan, -1.0f) == 1.0f, "a NaN gate steers");
    check(rowFlags(nan) == ALIGNER_FLAG_NONFINITE_SCORE && rowFlags(-inf) == ALIGNER_FLAG_NONFINITE_SCORE
            && rowFlags(0.5f) == 0u && rowFlags(-0.0f) == 0u,
        "ALIGNER_FLAG_NONFINITE_SCORE");
}
} // namespace

int main()
{
    testGoodManifest();
    testFormat3();
    testRefusals();
    testStamp();
    testDigestComparison();
    testPositionIds();
    testPrefillGate();
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
