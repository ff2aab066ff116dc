"""The C++ copies of the contract stay in step with the Python package (aligner_runtime.contract).

``plugins/common/steerContract.h`` spells the operator, file and node names once for the native code, and
``runtime/c/src/manifest.cpp`` reads the manifest and the engine stamp by key. Neither can import the Python names, so
this test reads their text: every string constant of the header must equal its Python twin, and every key the C reader
asks for must be a key the Python contract defines (at the same nesting)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aligner_runtime import contract
from aligner_runtime.contract import (STEERING_IO, EndRuleKey, GateKey, IntegrityKey, Key, StampKey, StrengthKey, node_name)

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "plugins" / "common" / "steerContract.h"
MANIFEST_CPP = ROOT / "runtime" / "c" / "src" / "manifest.cpp"
SIGNATURE_H = ROOT / "runtime" / "c" / "src" / "signature.h"

# Every constant of the header, and the Python value it must equal.
HEADER_TWINS = {
    "kDomain": contract.DOMAIN,
    "kPluginNamespace": contract.PLUGIN_NAMESPACE,
    "kSteerGate": contract.STEER_GATE,
    "kSteerShift": contract.STEER_SHIFT,
    "kSteerGateVersion1": contract.plugin_version(contract.STEER_GATE, 1),
    "kSteerGateVersion2": contract.plugin_version(contract.STEER_GATE, 2),
    "kSteerGateVersion3": contract.plugin_version(contract.STEER_GATE, 3),
    "kSteerShiftVersion1": contract.plugin_version(contract.STEER_SHIFT, shift_version=1),
    "kSteerShiftVersion2": contract.plugin_version(contract.STEER_SHIFT, shift_version=2),
    "kModelFile": contract.MODEL_FILE,
    "kManifestFile": contract.MANIFEST_FILE,
    "kEngineStampFile": contract.STAMP_FILE,
    "kManifestFormatVersion": contract.FORMAT_VERSION,
    "kManifestOldestFormatVersion": contract.OLDEST_VERIFIED_FORMAT_VERSION,
}
# Constants of the header that are messages, not contract facts.
HEADER_TEXT_ONLY = {"kManifestFormatAdvice"}


def _values(namespace) -> set[str]:
    return {v for k, v in vars(namespace).items() if not k.startswith("_") and isinstance(v, str)}


# The keys the C reader may ask for, by the path prefix it reports them under.
MANIFEST_KEYS = {"": _values(Key), "steering_io.": set(STEERING_IO), "gate.": _values(GateKey),
                 "strength.": _values(StrengthKey), "end_rule.": _values(EndRuleKey), "integrity.": _values(IntegrityKey)}
STAMP_KEYS = {"": _values(StampKey)}

_CONSTANT = re.compile(r"constexpr\s+(?:char\s+const\s*\*|int64_t)\s+(k\w+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|-?\d+)\s*;")
_REQUIRED = re.compile(r"required\w*\(\s*[\w*]+\s*,\s*\"([^\"]+)\"\s*,\s*\"([^\"]*)\"")
_FIND = re.compile(r"\.find\(\s*\"([^\"]+)\"\s*\)")


def header_constants(text: str) -> dict[str, str | int]:
    out = {}
    for name, value in _CONSTANT.findall(text):
        out[name] = value[1:-1] if value.startswith('"') else int(value)
    return out


def reader_keys(text: str) -> list[tuple[str, str]]:
    """``(prefix, key)`` for every key the C++ text asks for with required*(obj, "key", "prefix", ...) or
    obj.find("key") (a top-level, optional key)."""
    return [(prefix, key) for key, prefix in _REQUIRED.findall(text)] + [("", key) for key in _FIND.findall(text)]


def test_header_constants_equal_the_python_names():
    found = header_constants(HEADER.read_text())
    assert set(found) - HEADER_TEXT_ONLY == set(HEADER_TWINS), \
        "steerContract.h gained or lost a constant: map it to its Python name in HEADER_TWINS"
    for name, value in HEADER_TWINS.items():
        assert found[name] == value, f"steerContract.h {name} = {found[name]!r}, Python says {value!r}"


def test_header_versions_cover_the_registered_kinds():
    found = header_constants(HEADER.read_text())
    gate_versions = {v for k, v in found.items() if k.startswith("kSteerGateVersion")}
    assert gate_versions == {str(v) for v in contract.GATE_VERSIONS}
    shift_versions = {v for k, v in found.items() if k.startswith("kSteerShiftVersion")}
    assert shift_versions == {str(v) for v in contract.SHIFT_VERSIONS}


def test_header_node_name_builder_matches():
    text = HEADER.read_text()
    match = re.search(r"return\s+\"([^\"]+)\"\s*\+\s*std::to_string\(layer\)\s*\+\s*\"([^\"]+)\"\s*\+\s*op;", text)
    assert match, "steerNodeName's shape changed; update this test"
    assert match.group(1) + "7" + match.group(2) + contract.STEER_SHIFT == node_name(7, contract.STEER_SHIFT)


@pytest.mark.parametrize("function,allowed", [("parseManifest", MANIFEST_KEYS), ("parseEngineStamp", STAMP_KEYS)])
def test_c_reader_keys_are_python_keys(function, allowed):
    text = MANIFEST_CPP.read_text()
    start = text.index(f" {function}(std::string const&")
    end = text.find("\n}\n", start)
    body = text[start:end]
    keys = reader_keys(body)
    assert keys, f"found no keys in {function}; the reader's shape changed, update this test"
    for prefix, key in keys:
        assert prefix in allowed, f"{function} reads {prefix}{key}: no Python key set for '{prefix}'"
        assert key in allowed[prefix], f"{function} reads '{prefix}{key}', which the Python contract does not define"


def test_c_reader_strength_bounds_match():
    text = MANIFEST_CPP.read_text()
    low, high = contract.STRENGTH_HALF_LIFE
    assert float(re.search(r"halfLife\.get<double>\(\)\s*<=\s*([0-9.e+-]+)", text).group(1)) == high
    assert float(re.search(r"halfLife\.get<double>\(\)\s*>=\s*([0-9.e+-]+)", text).group(1)) == low


def test_c_signature_names_equal_the_python_signing_module():
    """runtime/c/src/signature.h spells the signature file, the signed bytes' prefix, the environment variables, the
    config directory and the limits of aligner_runtime.signing once for the C API (issue 21)."""
    from aligner_runtime import signing

    twins = {"kSignatureFile": signing.SIGNATURE_FILE, "kSignatureFormat": signing.SIGNATURE_FORMAT,
             "kSignatureAlgorithm": "ed25519", "kSignatureDomainTag": signing.DOMAIN_TAG.decode("ascii"),
             "kTrustedKeysEnv": signing.TRUSTED_KEYS_ENV, "kConfigDirEnv": signing.CONFIG_DIR_ENV,
             "kDefaultConfigDir": signing.DEFAULT_CONFIG_DIR, "kTrustedKeysSubdir": "trusted_keys",
             "kPublicKeySuffix": ".pub", "kMaxKeyBytes": signing.MAX_KEY_BYTES,
             "kMaxSignatureBytes": signing.MAX_SIGNATURE_BYTES, "kMaxKeys": signing.MAX_KEYS}
    found = {k: v.encode("ascii").decode("unicode_escape") if isinstance(v, str) else v
             for k, v in header_constants(SIGNATURE_H.read_text()).items()}
    assert set(found) == set(twins), "signature.h gained or lost a constant: map it to its Python name here"
    for name, value in twins.items():
        assert found[name] == value, f"signature.h {name} = {found[name]!r}, aligner_runtime.signing says {value!r}"
    # the names Python spells inline rather than as constants
    source = Path(signing.__file__).read_text()
    assert '"trusted_keys"' in source and '".pub"' in source and '("ed25519",)' in source


def test_the_parsers_catch_a_drift():
    """The parsing above would see a renamed key or constant (so the sync tests can fail)."""
    assert header_constants('constexpr char const* kModelFile = "model2.onnx";') == {"kModelFile": "model2.onnx"}
    keys = reader_keys('requiredInt(document, "gate_layers", "", where); document.find("strenght");')
    assert ("", "gate_layers") in keys and ("", "strenght") in keys
    assert "gate_layers" not in MANIFEST_KEYS[""] and "strenght" not in MANIFEST_KEYS[""]


def test_c_reader_shift_modes_match():
    """runtime/c/src/manifest.cpp maps every registered shift mode to its SteerShift version, and nothing else."""
    pairs = re.findall(r'\*shiftMode == "(\w+)"\)\s*\{\s*manifest\.shiftVersion = (\d+);', MANIFEST_CPP.read_text())
    assert {name: int(version) for name, version in pairs} == \
        {mode.name: version for version, mode in contract.SHIFT_MODES.items()}


def test_c_reader_refuses_the_format3_duplicates():
    """manifest.cpp refuses in a format-3 manifest exactly the top-level keys contract.GATE_DUPLICATES names."""
    text = MANIFEST_CPP.read_text()
    match = re.search(r"for \(auto const& duplicate : \{([^}]*)\}\)", text)
    assert match, "the format-3 duplicates loop of parseManifest changed shape; update this test"
    assert _FIND.findall(match.group(1)) == list(contract.GATE_DUPLICATES)
