"""The `lazysnap trust` command line.

    trust keygen --out DIR [--force]   DIR/index.key (0600, PKCS#8) + DIR/index.pub (PEM)

The private key signs index artifacts (`index build|sign --sign-key`, `accel serve
--sign-key`); the public key goes into the nodes' `[trust] public_keys`. Both are plain PEM
files cosign reads too (`cosign verify --key index.pub`, `cosign import-key-pair`).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trust_command", metavar="{keygen}", required=True)
    keygen = sub.add_parser(
        "keygen",
        help="make an ECDSA P-256 key pair for signing lazysnap indexes",
        description="Write DIR/index.key (private, mode 0600, unencrypted PKCS#8: keep it "
        "where only the index builder can read it) and DIR/index.pub (for the nodes' "
        "[trust] public_keys). Existing files are not replaced unless --force.",
    )
    keygen.add_argument("--out", required=True, metavar="DIR", help="directory for the pair")
    keygen.add_argument("--force", action="store_true", help="replace an existing pair")


def run(args: argparse.Namespace) -> int:
    from snapshotter.trust.keys import TrustKeyError, write_key_pair

    try:
        private, public, key = write_key_pair(args.out, overwrite=args.force)
    except (TrustKeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"key {key.public.key_id}: private {private} (mode 0600), public {public}")
    return 0
