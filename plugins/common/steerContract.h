// The contract facts the native code shares (docs/contract.md, "Where the contract lives"): the domain and plugin
// namespace, the op names and versions, the file names of an export and an engine directory, and the steering node
// names /model/layers.{l}/steer/{Op}. The plugins and the C runtime take them from here; no other C++ file spells
// them. Graph I/O names are not here: the C runtime reads them from the manifest's steering_io.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

namespace aligner
{
namespace contract
{

constexpr char const* kDomain = "inferaligner";
constexpr char const* kPluginNamespace = "inferaligner";

constexpr char const* kSteerGate = "SteerGate";
constexpr char const* kSteerShift = "SteerShift";

// SteerGate 1: (hidden, attention_mask, gate_in); SteerGate 2 adds score_in and pools K tokens (§5.1); SteerGate 3
// (the pooled gate, issue 18) adds max_weight and the max over every valid prompt position.
constexpr char const* kSteerGateVersion1 = "1";
constexpr char const* kSteerGateVersion2 = "2";
constexpr char const* kSteerGateVersion3 = "3";
// SteerShift 1: h + gate·v ("add"); SteerShift 2 rescales to the norm before the shift ("norm", issue 17).
constexpr char const* kSteerShiftVersion1 = "1";
constexpr char const* kSteerShiftVersion2 = "2";

constexpr char const* kModelFile = "model.onnx";
constexpr char const* kManifestFile = "inferaligner.json";
constexpr char const* kEngineStampFile = "ENGINE.json";

// The manifest formats this native code reads, kManifestOldestFormatVersion (2: the first with integrity digests) to
// kManifestFormatVersion (3: each gate fact once, in "gate"); format-1 exports are refused with kManifestFormatAdvice.
constexpr int64_t kManifestFormatVersion = 3;
constexpr int64_t kManifestOldestFormatVersion = 2;
constexpr char const* kManifestFormatAdvice = "re-export with inferaligner-edge ≥ 0.2";

// True for the two steering op types.
inline bool isSteerOp(std::string const& op)
{
    return op == kSteerGate || op == kSteerShift;
}

// "/model/layers.{layer}/steer/{op}".
inline std::string steerNodeName(int64_t layer, std::string const& op)
{
    return "/model/layers." + std::to_string(layer) + "/steer/" + op;
}

// Parses a steering node name; false for anything else (a non-decimal or negative layer, another op, a suffix).
inline bool parseSteerNodeName(std::string const& name, int64_t& layer, std::string& op)
{
    std::string const prefix = "/model/layers.";
    std::string const middle = "/steer/";
    if (name.compare(0, prefix.size(), prefix) != 0)
    {
        return false;
    }
    size_t const digitsEnd = name.find('/', prefix.size());
    if (digitsEnd == std::string::npos || digitsEnd == prefix.size() || digitsEnd - prefix.size() > 9)
    {
        return false;
    }
    for (size_t i = prefix.size(); i < digitsEnd; ++i)
    {
        if (name[i] < '0' || name[i] > '9')
        {
            return false;
        }
    }
    // No leading zeros: the builder never writes them, so "layers.03" names no node.
    if (name[prefix.size()] == '0' && digitsEnd - prefix.size() > 1)
    {
        return false;
    }
    if (name.compare(digitsEnd, middle.size(), middle) != 0)
    {
        return false;
    }
    std::string const candidate = name.substr(digitsEnd + middle.size());
    if (!isSteerOp(candidate))
    {
        return false;
    }
    layer = std::strtoll(name.c_str() + prefix.size(), nullptr, 10);
    op = candidate;
    return true;
}

} // namespace contract
} // namespace aligner
