// What the C runtime reads from an export's manifest (inferaligner.json, format 2) and from the ENGINE.json stamp, and
// the comparison of the plugin library's constants digests with the manifest (docs/contract.md "Integrity digests").
// Host-only (nlohmann/json, no TensorRT), so ctest runtime_helpers covers it without a GPU.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace aligner
{
namespace runtime
{

// A refused manifest or stamp: one line naming the file and the key.
struct ManifestError : std::runtime_error
{
    using std::runtime_error::runtime_error;
};

// The graph's steering I/O names (manifest "steering_io").
struct SteeringIo
{
    std::string gateIn;
    std::string gate;
    std::string score;
};

struct Manifest
{
    int64_t formatVersion{0};
    SteeringIo io;
    bool twoPassPrefill{false};
    std::vector<int64_t> gateLayers; // "gate": {"layers": [...]}, ascending
    int64_t gateLayer{-1};           // g* = the last gate layer
    std::vector<int64_t> steerLayers;
    std::map<std::string, std::string> constantDigests; // "integrity": {"constants": {node name: hex}}
    // "strength": {"half_life", "floor"}, optional (docs/contract.md "Strength schedule"); half-life 0: constant.
    double strengthHalfLife{0.0};
    double strengthFloor{0.0};
    // "end_rule": {"after", "slope"}, optional (docs/contract.md "Ending a steered answer"); after -1: no rule. The
    // bonus goes to the manifest's eos_token_ids (read only with a rule).
    int64_t endRuleAfter{-1};
    double endRuleSlope{0.0};
    std::vector<int64_t> eosTokenIds;
    // "shift_mode", optional (issue 17): "add" (SteerShift version 1, also when absent) or "norm" (version 2).
    int64_t shiftVersion{1};
    // "gate.version": the SteerGate version of the export's gate nodes (1, 2 or 3: the pooled gate, issue 18), so
    // the engine loader asks the plugin library for that creator.
    int64_t gateVersion{1};
};

// Parses and checks inferaligner.json; `where` names the file in messages. Every key above is required (a missing
// key is a refusal, never a skipped check); format_version must be 2 or 3; format 2's gate_layer must be the last of
// gate.layers, and format 3 must not hold gate_layer, bias or bias_rule (gateLayer is then the last of gate.layers);
// integrity.constants must name exactly the steering nodes that gate.layers and steer_layers place.
Manifest parseManifest(std::string const& text, std::string const& where);

// The ENGINE.json facts the C runtime checks; all four are required.
struct EngineStamp
{
    std::string manifestSha256;
    std::string trtVersion;
    std::string computeCapability;
    std::string engineSha256;
};

EngineStamp parseEngineStamp(std::string const& text, std::string const& where);

// One entry of the plugin library's digest registry (plugins/tensorrt/pluginDigestRegistry.h).
struct PluginDigest
{
    std::string name;
    std::string op;
    std::string version;
    std::string hex;
};

// Empty when the registry matches integrity.constants: every steering node of the manifest present with its digest,
// no other steering plugin. Otherwise one line naming the first node that differs.
std::string compareConstantDigests(Manifest const& manifest, std::vector<PluginDigest> const& registry);

} // namespace runtime
} // namespace aligner
