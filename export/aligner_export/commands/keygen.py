"""``aligner-export keygen -o KEY``: a new Ed25519 key pair for signing exports (docs/integrity.md "Signatures").

Writes the private key ``KEY`` (PEM PKCS#8, unencrypted, mode 0600: keep it off the devices) and the public key
``KEY.pub``, which the devices trust (``--trusted-key``, ``$INFERALIGNER_TRUSTED_KEYS`` or the config directory's
``trusted_keys/``).
"""

from __future__ import annotations

from aligner_runtime.errors import check_writable_file
from aligner_runtime.signing import keygen


def configure(parser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="KEY",
                        help="the private key file to write; the public key goes to KEY.pub")
    parser.add_argument("--force", action="store_true", help="replace existing key files")


def run(args) -> int:
    check_writable_file(args.output, "key file")
    private, public, key_id = keygen(args.output, force=args.force)
    print(f"wrote {private} (private: keep it secret) and {public} (trust this one on the devices); key id {key_id}")
    return 0
