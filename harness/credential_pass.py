"""A throw-away `pass` store for the real `docker-credential-pass` (Debian's
golang-docker-credential-helpers): its own GNUPGHOME with a passphrase-less key, its own
PASSWORD_STORE_DIR. Code under test finds both through the environment it inherits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.procs import HarnessError

PROGRAMS = ("docker-credential-pass", "pass", "gpg", "gpgconf")


@dataclass(frozen=True)
class PassStore:
    env: dict[str, str]  # GNUPGHOME and PASSWORD_STORE_DIR, to put into the environment

    def store(self, server_url: str, user: str, secret: str) -> None:
        """`docker-credential-pass store`, the way `docker login` with credsStore=pass does."""
        doc = {"ServerURL": server_url, "Username": user, "Secret": secret}
        _run(["docker-credential-pass", "store"], self.env, json.dumps(doc))


@contextlib.contextmanager
def pass_store() -> Iterator[PassStore]:
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise HarnessError(f"{', '.join(missing)} missing: run scripts/install-deps.sh")
    base = Path(tempfile.mkdtemp(prefix="lzs-pass-", dir="/tmp"))  # short: gpg socket paths
    gnupg = base / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(gnupg), "PASSWORD_STORE_DIR": str(base / "store")}
    try:
        uid = "lazysnap-test@example.invalid"
        quick = ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "default", "default"]
        _run(quick, env)
        colons = _run(["gpg", "--list-keys", "--with-colons", uid], env)
        fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line[:4] == "fpr:")
        _run(["pass", "init", fingerprint], env)
        yield PassStore(env)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=_with(env), check=False, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _with(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


def _run(argv: list[str], env: dict[str, str], stdin: str = "") -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, env=_with(env)
    )
    if done.returncode != 0:
        raise HarnessError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
