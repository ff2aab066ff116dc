"""``aligner-export sign --key KEY EXPORT``: sign an export directory (docs/integrity.md "Signatures").

The export is loaded first with every check the device runs (digests, weights, key facts), so a tampered or broken
export is refused instead of signed; then ``EXPORT/inferaligner.sig`` is written (atomically) over the sha256 of that
same manifest, whose digests cover the graph, the weights and the tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from aligner_runtime.manifest import load_export
from aligner_runtime.signing import SIGNATURE_FILE, TrustedKeys, load_private_key, sign_export


def configure(parser) -> None:
    parser.add_argument("export", help="the export directory to sign")
    parser.add_argument("--key", required=True, help="the Ed25519 private key (from 'aligner-export keygen')")


def run(args) -> int:
    print(sign(Path(args.export), Path(args.key)))
    return 0


def sign(export: Path, key: Path) -> str:
    load_private_key(key)  # a bad key fails before the export is read
    # the signer's own trusted keys do not apply: the export is not signed yet
    checked = load_export(export, trusted_keys=TrustedKeys({}, "signing"))
    record = sign_export(export, key, expected_sha256=checked.manifest_sha256)
    return (f"signed {export / SIGNATURE_FILE}: manifest sha256 {record['manifest_sha256']}, key id "
            f"{record['key_id']}")
