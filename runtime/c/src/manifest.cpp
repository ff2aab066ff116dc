#include "manifest.h"

#include "steerContract.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>

namespace aligner
{
namespace runtime
{
namespace
{
using nlohmann::json;

json parseObject(std::string const& text, std::string const& where)
{
    json document;
    try
    {
        document = json::parse(text);
    }
    catch (json::exception const& e)
    {
        throw ManifestError(where + " is not valid JSON: " + e.what());
    }
    if (!document.is_object())
    {
        throw ManifestError(where + " is not a JSON object");
    }
    return document;
}

// The value of `key` in `object` (whose path in the file is `path`); refuses a missing key.
json const& required(json const& object, char const* key, std::string const& path, std::string const& where)
{
    auto const found = object.find(key);
    if (found == object.end())
    {
        throw ManifestError(where + " lacks '" + path + key + "'");
    }
    return *found;
}

std::string requiredString(json const& object, char const* key, std::string const& path, std::string const& where)
{
    json const& value = required(object, key, path, where);
    if (!value.is_string() || value.get_ref<std::string const&>().empty())
    {
        throw ManifestError(where + ": '" + path + key + "' must be a non-empty string");
    }
    return value.get<std::string>();
}

json const& requiredObject(json const& object, char const* key, std::string const& path, std::string const& where)
{
    json const& value = required(object, key, path, where);
    if (!value.is_object())
    {
        throw ManifestError(where + ": '" + path + key + "' must be an object");
    }
    return value;
}

int64_t requiredInt(json const& object, char const* key, std::string const& path, std::string const& where)
{
    json const& value = required(object, key, path, where);
    if (!value.is_number_integer())
    {
        throw ManifestError(where + ": '" + path + key + "' must be an integer");
    }
    return value.get<int64_t>();
}

// A non-empty array of distinct non-negative layer indices, returned in ascending order.
std::vector<int64_t> requiredLayers(json const& object, char const* key, std::string const& path,
    std::string const& where)
{
    json const& value = required(object, key, path, where);
    std::string const name = "'" + path + key + "'";
    if (!value.is_array() || value.empty())
    {
        throw ManifestError(where + ": " + name + " must be a non-empty array of layer indices");
    }
    std::vector<int64_t> layers;
    for (json const& item : value)
    {
        if (!item.is_number_integer() || item.get<int64_t>() < 0)
        {
            throw ManifestError(where + ": " + name + " holds " + item.dump() + ", not a layer index");
        }
        layers.push_back(item.get<int64_t>());
    }
    std::sort(layers.begin(), layers.end());
    if (std::adjacent_find(layers.begin(), layers.end()) != layers.end())
    {
        throw ManifestError(where + ": " + name + " repeats a layer");
    }
    return layers;
}

bool isLowerHex64(std::string const& text)
{
    return text.size() == 64
        && std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

std::string layerList(std::vector<int64_t> const& layers)
{
    std::string out = "[";
    for (size_t i = 0; i < layers.size(); ++i)
    {
        out += (i ? ", " : "") + std::to_string(layers[i]);
    }
    return out + "]";
}
} // namespace

Manifest parseManifest(std::string const& text, std::string const& where)
{
    json const document = parseObject(text, where);
    Manifest manifest;
    // The format first: an older export is told to re-export, not that some newer key is missing.
    manifest.formatVersion = requiredInt(document, "format_version", "", where);
    if (manifest.formatVersion < contract::kManifestOldestFormatVersion
        || manifest.formatVersion > contract::kManifestFormatVersion)
    {
        throw ManifestError(where + " has format_version " + std::to_string(manifest.formatVersion)
            + "; this runtime reads formats " + std::to_string(contract::kManifestOldestFormatVersion) + " to "
            + std::to_string(contract::kManifestFormatVersion) + " ("
            + (manifest.formatVersion < contract::kManifestOldestFormatVersion
                    ? std::string(contract::kManifestFormatAdvice)
                    : std::string("a newer inferaligner-edge wrote it"))
            + ")");
    }

    json const& io = requiredObject(document, "steering_io", "", where);
    manifest.io.gateIn = requiredString(io, "gate_in", "steering_io.", where);
    manifest.io.gate = requiredString(io, "gate", "steering_io.", where);
    manifest.io.score = requiredString(io, "score", "steering_io.", where);

    json const& twoPass = required(document, "two_pass_prefill", "", where);
    if (!twoPass.is_boolean())
    {
        throw ManifestError(where + ": 'two_pass_prefill' must be true or false");
    }
    manifest.twoPassPrefill = twoPass.get<bool>();

    json const& gate = requiredObject(document, "gate", "", where);
    manifest.gateLayers = requiredLayers(gate, "layers", "gate.", where);
    manifest.gateVersion = requiredInt(gate, "version", "gate.", where);
    if (manifest.gateVersion < 1 || manifest.gateVersion > 3)
    {
        throw ManifestError(where + ": 'gate.version' " + std::to_string(manifest.gateVersion)
            + " is not a SteerGate version this runtime serves (1, 2 or 3)");
    }
    if (manifest.formatVersion >= 3)
    {
        // Format 3 records the gate's layers, bias and rule once, in "gate" (contract.GATE_DUPLICATES).
        for (auto const& duplicate : {document.find("gate_layer"), document.find("bias"), document.find("bias_rule")})
        {
            if (duplicate != document.end())
            {
                throw ManifestError(where + ": format 3 records the gate's layers, bias and rule once, in 'gate'; it "
                    + "must not hold '" + duplicate.key() + "'");
            }
        }
        manifest.gateLayer = manifest.gateLayers.back();
    }
    else
    {
        manifest.gateLayer = requiredInt(document, "gate_layer", "", where);
        if (manifest.gateLayer != manifest.gateLayers.back())
        {
            throw ManifestError(where + ": gate_layer " + std::to_string(manifest.gateLayer)
                + " is not the last of gate.layers " + layerList(manifest.gateLayers));
        }
    }
    manifest.steerLayers = requiredLayers(document, "steer_layers", "", where);

    auto const strength = document.find("strength");
    if (strength != document.end() && !strength->is_null())
    {
        if (!strength->is_object())
        {
            throw ManifestError(where + ": 'strength' must be an object");
        }
        json const& halfLife = required(*strength, "half_life", "strength.", where);
        json const& floor = required(*strength, "floor", "strength.", where);
        if (!halfLife.is_number() || !floor.is_number() || !(halfLife.get<double>() >= 1e-3)
            || !(halfLife.get<double>() <= 1e6) || !(floor.get<double>() >= 0.0) || !(floor.get<double>() <= 1.0))
        {
            throw ManifestError(where + ": 'strength' needs half_life in [0.001, 1e6] and floor in [0, 1]");
        }
        manifest.strengthHalfLife = halfLife.get<double>();
        manifest.strengthFloor = floor.get<double>();
    }

    auto const endRule = document.find("end_rule");
    if (endRule != document.end() && !endRule->is_null())
    {
        if (!endRule->is_object())
        {
            throw ManifestError(where + ": 'end_rule' must be an object");
        }
        json const& after = required(*endRule, "after", "end_rule.", where);
        json const& slope = required(*endRule, "slope", "end_rule.", where);
        // The limits of aligner_runtime.contract.END_RULE_LIMITS.
        if (!after.is_number_integer() || after.get<int64_t>() < 0 || after.get<int64_t>() > 4096
            || !slope.is_number() || !(slope.get<double>() > 0.0) || !(slope.get<double>() <= 100.0))
        {
            throw ManifestError(where + ": 'end_rule' needs an integer after in [0, 4096] and slope in (0, 100]");
        }
        json const& eos = required(document, "eos_token_ids", "", where);
        if (!eos.is_array() || eos.empty() || eos.size() > 64)
        {
            throw ManifestError(where + ": 'eos_token_ids' must be a list of 1 to 64 token ids with an end_rule");
        }
        for (json const& id : eos)
        {
            if (!id.is_number_integer() || id.get<int64_t>() < 0)
            {
                throw ManifestError(where + ": 'eos_token_ids' must hold token ids >= 0");
            }
            manifest.eosTokenIds.push_back(id.get<int64_t>());
        }
        manifest.endRuleAfter = after.get<int64_t>();
        manifest.endRuleSlope = slope.get<double>();
    }

    // aligner_runtime.contract.SHIFT_MODE_NAMES, by their SteerShift versions; exports before issue 17 have none.
    auto const shiftMode = document.find("shift_mode");
    if (shiftMode != document.end() && !shiftMode->is_null())
    {
        if (*shiftMode == "add")
        {
            manifest.shiftVersion = 1;
        }
        else if (*shiftMode == "norm")
        {
            manifest.shiftVersion = 2;
        }
        else
        {
            throw ManifestError(where + ": 'shift_mode' must be \"add\" or \"norm\"");
        }
    }

    json const& integrity = requiredObject(document, "integrity", "", where);
    json const& constants = requiredObject(integrity, "constants", "integrity.", where);
    for (auto const& item : constants.items())
    {
        if (!item.value().is_string() || !isLowerHex64(item.value().get<std::string>()))
        {
            throw ManifestError(where + ": integrity.constants['" + item.key()
                + "'] must be a lowercase hex sha256");
        }
        manifest.constantDigests[item.key()] = item.value().get<std::string>();
    }
    // The steering nodes the manifest places, each with exactly one digest.
    std::set<std::string> placed;
    for (int64_t layer : manifest.gateLayers)
    {
        placed.insert(contract::steerNodeName(layer, contract::kSteerGate));
    }
    for (int64_t layer : manifest.steerLayers)
    {
        placed.insert(contract::steerNodeName(layer, contract::kSteerShift));
    }
    for (std::string const& node : placed)
    {
        if (manifest.constantDigests.count(node) == 0)
        {
            throw ManifestError(where + ": integrity.constants lacks the digest of steering node " + node);
        }
    }
    for (auto const& entry : manifest.constantDigests)
    {
        if (placed.count(entry.first) == 0)
        {
            throw ManifestError(where + ": integrity.constants names " + entry.first
                + ", which is not a steering node of gate.layers " + layerList(manifest.gateLayers)
                + " / steer_layers " + layerList(manifest.steerLayers));
        }
    }
    return manifest;
}

EngineStamp parseEngineStamp(std::string const& text, std::string const& where)
{
    json const document = parseObject(text, where);
    EngineStamp stamp;
    stamp.manifestSha256 = requiredString(document, "manifest_sha256", "", where);
    stamp.trtVersion = requiredString(document, "trt_version", "", where);
    stamp.computeCapability = requiredString(document, "compute_capability", "", where);
    stamp.engineSha256 = requiredString(document, "engine_sha256", "", where);
    return stamp;
}

std::string compareConstantDigests(Manifest const& manifest, std::vector<PluginDigest> const& registry)
{
    std::set<std::string> seen;
    for (PluginDigest const& entry : registry)
    {
        auto const expected = manifest.constantDigests.find(entry.name);
        if (expected == manifest.constantDigests.end())
        {
            return "the engine holds steering plugin '" + entry.name + "' (" + entry.op + " version " + entry.version
                + ") that the export's manifest does not list";
        }
        int64_t layer = -1;
        std::string op;
        if (!contract::parseSteerNodeName(entry.name, layer, op) || op != entry.op)
        {
            return "steering node " + entry.name + " became a " + entry.op + " plugin in the engine";
        }
        if (entry.hex != expected->second)
        {
            return "constants of steering node " + entry.name + " differ between the engine (sha256 "
                + entry.hex.substr(0, 16) + "...) and the export's manifest (" + expected->second.substr(0, 16)
                + "...)";
        }
        seen.insert(entry.name);
    }
    for (auto const& expected : manifest.constantDigests)
    {
        if (seen.count(expected.first) == 0)
        {
            return "the engine has no steering plugin for " + expected.first
                + " (was it built from this export, with the inferaligner plugin library?)";
        }
    }
    return {};
}

} // namespace runtime
} // namespace aligner
