"""The C API refuses what the Python loader refuses (issue 21, docs/integrity.md "Signatures").

``aligner_model_create`` checks the export's signature before it reads anything else of it, with
``runtime/c/src/signature.cpp`` (OpenSSL's Ed25519). That check is built into ``libaligner_signature_check`` too, a C
ABI for ctypes, so it runs here without TensorRT or a GPU. A tiny real export is signed with ``aligner-export keygen``
and ``aligner-export sign`` (aligner_runtime/signing.py, the ``cryptography`` package: an implementation independent of
OpenSSL's C API); the C check must accept it with its key and refuse, with the Python loader's own message, an
unsigned export, a tampered manifest, another key, a forged signature and a wrong ``expect_sha256``.

The library comes from the CMake build (``ALIGNER_NATIVE_BUILD``, default ``build/``); without it the tests skip and
say so.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import pytest

from aligner_runtime import signing
from aligner_runtime.contract import MANIFEST_FILE
from aligner_runtime.errors import AlignerError
from aligner_runtime.manifest import load_export, manifest_sha256
from runtime_exports import DEFAULT_OPTIONS, tiny_export

ROOT = Path(__file__).resolve().parents[1]
# aligner_status (runtime/c/include/aligner_runtime.h)
OK, INVALID_ARGUMENT, FILE, SIGNATURE = 0, 1, 2, 9


@pytest.fixture(scope="module")
def check():
    build = Path(os.environ.get("ALIGNER_NATIVE_BUILD", ROOT / "build"))
    path = build / "libaligner_signature_check.so"
    if not path.is_file():
        pytest.skip(f"{path} not built (run `make native` or set ALIGNER_NATIVE_BUILD; it needs nlohmann/json and "
                    f"OpenSSL's libcrypto)")
    lib = ctypes.CDLL(str(path))
    fn = lib.aligner_signature_check
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]

    def call(export_dir, trusted_keys=None, expect_sha256=None) -> tuple[int, str]:
        message = ctypes.create_string_buffer(4096)
        enc = (lambda v: None if v is None else str(v).encode())
        status = fn(enc(export_dir), enc(trusted_keys), enc(expect_sha256), message, len(message))
        return status, message.value.decode("utf-8")

    return call


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_model_dir):
    """A tiny export signed with a key from `aligner-export keygen`, and a second (the forger's) key."""
    from aligner_export.commands.cli import main

    source = tiny_export(tmp_path_factory, tiny_model_dir, "llama", DEFAULT_OPTIONS)[0]
    root = tmp_path_factory.mktemp("capi-signed")
    for name in ("producer", "forger"):
        assert main(["keygen", "-o", str(root / f"{name}.key")]) == 0
    path = root / "export"
    shutil.copytree(source, path)
    assert main(["sign", "--key", str(root / "producer.key"), str(path)]) == 0
    return {"export": path, "public": root / "producer.key.pub", "forger": root / "forger.key",
            "forger_public": root / "forger.key.pub"}


@pytest.fixture(autouse=True)
def no_configured_keys(monkeypatch, tmp_path):
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(tmp_path / "no-config"))


def _copy(signed, tmp_path) -> Path:
    path = tmp_path / "export"
    shutil.copytree(signed["export"], path)
    return path


def _python_refusal(path: Path, trusted_keys=None, expect_sha256=None) -> str:
    with pytest.raises(AlignerError) as caught:
        load_export(path, trusted_keys=trusted_keys, expect_sha256=expect_sha256)
    return str(caught.value)


def test_signed_and_trusted_loads(check, signed, monkeypatch, tmp_path):
    path = signed["export"]
    status, message = check(path, signed["public"])
    assert (status, message.split(":")[0]) == (OK, "verified"), message
    assert signed["public"].name in message
    # every source of trust Python reads: the environment variable (a directory of *.pub), the config directory
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(signed["public"].parent))
    status, message = check(path)
    assert status == OK and message.startswith("verified"), message
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)
    keydir = tmp_path / "config" / "trusted_keys"
    keydir.mkdir(parents=True)
    shutil.copy(signed["public"], keydir / "producer.pub")
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(tmp_path / "config"))
    status, message = check(path)
    assert status == OK and message.startswith("verified"), message
    # the caller's keys come first: the forger's key given explicitly refuses the producer's export
    status, message = check(path, signed["forger_public"])
    assert status == SIGNATURE and "not among the trusted keys (given by the caller)" in message
    # the pin, right and in upper case, with the key
    status, message = check(path, signed["public"], manifest_sha256(path).upper())
    assert status == OK, message


def test_without_keys_nothing_is_required(check, signed, tmp_path):
    path = _copy(signed, tmp_path)
    (path / signing.SIGNATURE_FILE).write_text("not json")
    status, message = check(path)
    assert status == OK and message.startswith("not required"), message
    (path / signing.SIGNATURE_FILE).unlink()
    assert check(path)[0] == OK


def _tamper_manifest(path: Path) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["alpha"] = manifest["alpha"] / 100
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _flip_signature(path: Path) -> None:
    record = json.loads((path / signing.SIGNATURE_FILE).read_text())
    sig = record["signature"]
    record["signature"] = sig[:10] + ("B" if sig[10] == "A" else "A") + sig[11:]
    (path / signing.SIGNATURE_FILE).write_text(json.dumps(record))


def _resign_with_forger(signed):
    def edit(path: Path) -> None:
        _tamper_manifest(path)
        signing.sign_export(path, signed["forger"])
    return edit


@pytest.mark.parametrize("case, expected", [
    ("unsigned", "the export is not signed (inferaligner.sig missing) and trusted keys are configured"),
    ("tampered manifest", "the signature is for another manifest"),
    ("tampered and re-signed by another key", "which is not among the trusted keys"),
    ("forged signature", "does not verify with the trusted key producer.key.pub"),
])
def test_refused_with_the_python_loaders_message(check, signed, tmp_path, case, expected):
    path = _copy(signed, tmp_path)
    edit = {"unsigned": lambda p: (p / signing.SIGNATURE_FILE).unlink(), "tampered manifest": _tamper_manifest,
            "tampered and re-signed by another key": _resign_with_forger(signed),
            "forged signature": _flip_signature}[case]
    edit(path)
    status, message = check(path, signed["public"])
    assert status == SIGNATURE and expected in message and "\n" not in message, message
    assert message.startswith(f"refusing {path}: ")
    # the same words as the Python loader (whose message is the same one line)
    assert message == _python_refusal(path, trusted_keys=[signed["public"]])


def test_wrong_expect_sha256_is_refused(check, signed):
    path = signed["export"]
    for keys in (None, signed["public"]):
        status, message = check(path, keys, "0" * 64)
        assert status == SIGNATURE and "not the expected 0000000000000000" in message, message
        assert message == _python_refusal(path, trusted_keys=[keys] if keys else None, expect_sha256="0" * 64)
    status, message = check(path, None, "abc")
    assert status == INVALID_ARGUMENT and "64 hex digits" in message


@pytest.mark.parametrize("edit, expected", [
    (lambda r: {**r, "signature": "!!"}, "'signature' is not base64"),
    (lambda r: {**r, "signature": "AAAA"}, "'signature' is not an Ed25519 signature (64 bytes)"),
    (lambda r: {**r, "format": 2}, "has format 2; this runtime reads 1"),
    (lambda r: {k: v for k, v in r.items() if k != "key_id"}, "'key_id' is missing"),
    (lambda r: {**r, "manifest_sha256": r["manifest_sha256"].upper()}, "'manifest_sha256' must be a sha256 digest"),
    (lambda r: [r], "is not a JSON object"),
])
def test_bad_signature_files(check, signed, tmp_path, edit, expected):
    path = _copy(signed, tmp_path)
    sig = path / signing.SIGNATURE_FILE
    sig.write_text(json.dumps(edit(json.loads(sig.read_text()))))
    status, message = check(path, signed["public"])
    assert status == SIGNATURE and expected in message and "\n" not in message, message
    assert message == _python_refusal(path, trusted_keys=[signed["public"]])


def test_bad_trusted_keys_are_file_errors(check, signed, tmp_path):
    path = signed["export"]
    status, message = check(path, tmp_path / "missing.pub")
    assert status == FILE and "trusted key not found" in message
    (tmp_path / "empty").mkdir()
    status, message = check(path, tmp_path / "empty")
    assert status == FILE and "holds no .pub file" in message
    # a private key is not a public key; the signature check never takes one for the other
    status, message = check(path, signed["forger"])
    assert status == FILE and "not a PEM public key" in message
