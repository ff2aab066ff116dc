"""Signed exports (issue 21, docs/integrity.md "Signatures").

The producer signs the sha256 of the manifest ``inferaligner.json`` with Ed25519 (``cryptography``); the manifest's
integrity digests cover the graph, the steering constants, the weights and the tokenizer files, so the signature
covers them too. The signature lies beside the manifest in ``inferaligner.sig``::

    {"format": 1, "algorithm": "ed25519", "key_id": "<sha256 of the raw 32-byte public key>",
     "manifest_sha256": "<hex>", "signature": "<base64 of the 64-byte signature>"}

over the bytes ``b"inferaligner-edge export signature 1\\n" + manifest_sha256`` (ASCII hex).

The device trusts the public keys (``.pub``, PEM) named, first found wins:

1. by the caller: ``Aligner.load(..., trusted_keys=[...])``, ``aligner-run --trusted-key``, ``aligner-serve
   --trusted-key`` (files or directories of ``*.pub``);
2. by the environment variable ``INFERALIGNER_TRUSTED_KEYS`` (paths separated by ``os.pathsep``);
3. by the config directory ``INFERALIGNER_CONFIG_DIR`` (default ``/etc/inferaligner``): its ``trusted_keys/``.

When any key is configured every load refuses, with one line, an unsigned export, a signature that does not verify,
one by a key that is not trusted, and one made for another manifest. ``expect_sha256`` pins one export by its
manifest digest, with or without keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .contract import MANIFEST_FILE
from .errors import AlignerError, atomic_path

SIGNATURE_FILE = "inferaligner.sig"
SIGNATURE_FORMAT = 1
DOMAIN_TAG = b"inferaligner-edge export signature 1\n"
TRUSTED_KEYS_ENV = "INFERALIGNER_TRUSTED_KEYS"
CONFIG_DIR_ENV = "INFERALIGNER_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "/etc/inferaligner"
MAX_KEY_BYTES = 16 << 10  # a PEM Ed25519 key is about 120 bytes
MAX_SIGNATURE_BYTES = 16 << 10
MAX_KEYS = 1024


def add_trust_options(parser, purpose: str = "only an export signed by one loads") -> None:
    """``--trusted-key`` and ``--expect-sha256``, the same in every command that loads or checks an export."""
    parser.add_argument("--trusted-key", action="append", default=None, metavar="KEY",
                        help=f"a trusted public key (.pub) or a directory of them: {purpose} (repeatable; default: "
                             f"${TRUSTED_KEYS_ENV} or {DEFAULT_CONFIG_DIR}/trusted_keys)")
    parser.add_argument("--expect-sha256", default=None, metavar="HEX",
                        help="refuse the export unless its manifest's sha256 is this (pins one export)")


def _crypto():
    try:
        # deferred: cryptography loads OpenSSL; only signed exports, trusted keys and signing need it
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # a core dependency: only a broken install lacks it
        raise AlignerError("signature checks need the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature


def _raw_public(public_key) -> bytes:
    serialization, _, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


# --- keys ------------------------------------------------------------------------------------------------------------
def keygen(private_path: str | os.PathLike, force: bool = False) -> tuple[Path, Path, str]:
    """Writes a new Ed25519 private key (PEM PKCS#8, mode 0600) and its public key ``<private>.pub``; returns the
    paths and the key id."""
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise AlignerError(f"{path} exists; pass --force to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_path(private_path) as tmp:
        tmp.write_bytes(private_pem)
    os.chmod(private_path, 0o600)
    with atomic_path(public_path) as tmp:
        tmp.write_bytes(public_pem)
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: str | os.PathLike):
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    if not path.is_file():
        raise AlignerError(f"signing key not found: {path}")
    raw = schema.read_bounded(path, MAX_KEY_BYTES, "signing key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise AlignerError(f"{path}: not an unencrypted PEM private key ({schema.first_line(exc, 80)})") from None
    except Exception as exc:  # noqa: BLE001 - cryptography's UnsupportedAlgorithm and backend errors
        raise AlignerError(f"{path}: not a usable private key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AlignerError(f"{path}: not an Ed25519 key (make one with 'aligner-export keygen')")
    return key


def load_public_key(path: Path):
    serialization, ed25519, _ = _crypto()
    raw = schema.read_bounded(path, MAX_KEY_BYTES, "trusted key")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise AlignerError(f"trusted key {path}: not a PEM public key ({schema.first_line(exc, 80)})") from None
    except Exception as exc:  # noqa: BLE001 - cryptography's UnsupportedAlgorithm and backend errors
        raise AlignerError(f"trusted key {path}: not a usable public key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AlignerError(f"trusted key {path}: not an Ed25519 public key")
    return key


def _key_files(entry: Path, source: str) -> list[Path]:
    try:
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.suffix == ".pub" and p.is_file())
            if not files:
                raise AlignerError(f"the trusted key directory {entry} ({source}) holds no .pub file")
            return files
        if entry.is_file():
            return [entry]
    except OSError as exc:
        raise AlignerError(f"cannot read the trusted keys {entry} ({source}): {exc.strerror}") from None
    raise AlignerError(f"trusted key not found: {entry} ({source})")


@dataclass
class TrustedKeys:
    keys: dict  # key id -> (public key, file)
    source: str

    def __bool__(self) -> bool:
        return bool(self.keys)


def trusted_keys(explicit=None) -> TrustedKeys:
    """The configured trusted keys (module docstring for the order); empty when none is configured."""
    if isinstance(explicit, TrustedKeys):
        return explicit
    if explicit:
        entries, source = [Path(p) for p in ([explicit] if isinstance(explicit, (str, os.PathLike)) else explicit)], \
            "given by the caller"
    elif os.environ.get(TRUSTED_KEYS_ENV):
        entries = [Path(p) for p in os.environ[TRUSTED_KEYS_ENV].split(os.pathsep) if p]
        source = f"${TRUSTED_KEYS_ENV}"
    else:
        directory = Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR) / "trusted_keys"
        try:
            configured = directory.is_dir()
        except OSError:
            configured = False
        if not configured:
            return TrustedKeys({}, "none configured")
        entries, source = [directory], str(directory)
    keys = {}
    for entry in entries:
        for file in _key_files(entry, source):
            if len(keys) >= MAX_KEYS:
                raise AlignerError(f"more than {MAX_KEYS} trusted keys ({source})")
            key = load_public_key(file)
            keys[key_id(key)] = (key, file)
    return TrustedKeys(keys, source)


# --- signatures ------------------------------------------------------------------------------------------------------
def _message(manifest_sha256: str) -> bytes:
    return DOMAIN_TAG + manifest_sha256.encode("ascii")


def sign_export(directory: str | os.PathLike, key_path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """Writes ``inferaligner.sig`` for the export's manifest as it is now (atomically); returns the record.
    ``expected_sha256``: the digest of the manifest the caller checked; a manifest changed since is refused."""
    directory = Path(directory)
    key = load_private_key(key_path)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        raise AlignerError(f"not an export directory (no {MANIFEST_FILE}): {directory}")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise AlignerError(f"the manifest of {directory} changed while it was being signed; sign it again")
    record = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
              "manifest_sha256": digest,
              "signature": base64.b64encode(key.sign(_message(digest))).decode("ascii")}
    with atomic_path(directory / SIGNATURE_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def read_signature(directory: Path) -> dict | None:
    """The export's signature record, its kinds checked; None when there is none."""
    file = Path(directory) / SIGNATURE_FILE
    if not file.exists():
        return None
    where = f"the signature {file}"
    record = schema.loads(schema.read_bounded(file, MAX_SIGNATURE_BYTES, "signature"), where)
    if not isinstance(record, dict):
        raise AlignerError(f"{where} is not a JSON object")
    if schema.field(record, "format", "int", where) != SIGNATURE_FORMAT:
        raise AlignerError(f"{where} has format {record['format']!r:.20}; this runtime reads {SIGNATURE_FORMAT}")
    schema.field(record, "algorithm", "str", where, choices=("ed25519",))
    schema.field(record, "key_id", "sha256", where)
    schema.field(record, "manifest_sha256", "sha256", where)
    text = schema.field(record, "signature", "str", where)
    try:
        signature = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise AlignerError(f"{where}: 'signature' is not base64") from None
    if len(signature) != 64:
        raise AlignerError(f"{where}: 'signature' is not an Ed25519 signature (64 bytes)")
    return {**record, "signature_bytes": signature}


@dataclass
class SignatureCheck:
    state: str  # "verified", "not required", "unsigned"
    detail: str
    key_id: str | None = None


def _check_pin(expect_sha256: str | None, digest: str) -> None:
    if expect_sha256 is None:
        return
    wanted = str(expect_sha256).strip().lower()
    if len(wanted) != 64 or any(c not in "0123456789abcdef" for c in wanted):
        raise AlignerError("--expect-sha256 must be a sha256 digest (64 hex digits)")
    if wanted != digest:
        raise AlignerError(f"the manifest's sha256 is {digest[:16]}…, not the expected {wanted[:16]}… (another "
                           f"export, or a changed one)")


def check_export(directory: str | os.PathLike, manifest_sha256: str, trusted_keys=None,
                 expect_sha256: str | None = None) -> SignatureCheck:
    """Checks the export's signature against the configured trusted keys and the pin; refuses (one
    :class:`AlignerError`) when a key is configured and the signature is missing, bad or by an unknown key."""
    directory = Path(directory)
    _check_pin(expect_sha256, manifest_sha256)
    keys = _trusted(trusted_keys)
    if not keys:
        try:
            record = read_signature(directory)
        except AlignerError as exc:
            return SignatureCheck("not required", f"no trusted key configured; the signature file is unreadable: "
                                                  f"{exc}")
        if record is None:
            return SignatureCheck("not required", "no trusted key configured; the export is unsigned")
        return SignatureCheck("not required", f"no trusted key configured; signed by key {record['key_id'][:16]}… "
                                              f"(not verified)", record["key_id"])
    record = read_signature(directory)
    if record is None:
        raise AlignerError(f"the export is not signed ({SIGNATURE_FILE} missing) and trusted keys are configured "
                           f"({keys.source})")
    if record["manifest_sha256"] != manifest_sha256:
        raise AlignerError(f"the signature is for another manifest (sha256 {record['manifest_sha256'][:16]}…, this "
                           f"one is {manifest_sha256[:16]}…): the manifest was changed after signing")
    entry = keys.keys.get(record["key_id"])
    if entry is None:
        raise AlignerError(f"the export is signed by key {record['key_id'][:16]}…, which is not among the trusted "
                           f"keys ({keys.source})")
    public, file = entry
    _, _, invalid = _crypto()
    try:
        public.verify(record["signature_bytes"], _message(manifest_sha256))
    except invalid:
        raise AlignerError(f"the export's signature does not verify with the trusted key {file.name} (forged or "
                           f"corrupted signature)") from None
    return SignatureCheck("verified", f"signed by trusted key {file.name} ({record['key_id'][:16]}…)",
                          record["key_id"])


def _trusted(explicit) -> TrustedKeys:
    return explicit if isinstance(explicit, TrustedKeys) else trusted_keys(explicit)
