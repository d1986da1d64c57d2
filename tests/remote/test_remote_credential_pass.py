"""The real `docker-credential-pass` (Debian's golang-docker-credential-helpers) behind `pass`
and gpg, against docker-registry with Basic auth and with bearer token auth: a docker config
that names the helper (credsStore, or credHelpers for the host) is all the client is given."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.remote.auth import CredentialStore
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from tests.harness.registry import Registry
from tests.remote.conftest import BASIC_USERS, TOKEN_USERS, LogRecorder
from tests.remote.test_remote_auth_registry import roundtrip

pytestmark = pytest.mark.stack


def run(argv: list[str], stdin: str = "") -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def pass_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A throw-away gpg home with a passphrase-less key and a `pass` store using it; the
    helper, run by the code under test, finds both through the inherited environment."""
    for program in ("docker-credential-pass", "pass", "gpg", "gpgconf"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} missing: run scripts/install-deps.sh", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="lzs-pass-", dir="/tmp"))  # short: gpg socket paths
    gnupg, store = base / "gnupg", base / "store"
    gnupg.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(gnupg))
    monkeypatch.setenv("PASSWORD_STORE_DIR", str(store))
    try:
        uid = "lazysnap-test@example.invalid"
        run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "default", "default"])
        colons = run(["gpg", "--list-keys", "--with-colons", uid])
        fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line[:4] == "fpr:")
        run(["pass", "init", fingerprint])
        yield
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], check=False, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def store_in_pass(server_url: str, user: str, secret: str) -> None:
    doc = {"ServerURL": server_url, "Username": user, "Secret": secret}
    run(["docker-credential-pass", "store"], stdin=json.dumps(doc))


def client_from(config: Path, doc: dict[str, object], registry: Registry) -> RegistryClient:
    config.write_text(json.dumps(doc))
    return RegistryClient(
        HostsConfig(plain_http=[registry.host]),
        CredentialStore.from_docker_config(config),
        timeout=10,
        retries=1,
    )


def test_creds_store_pass_against_basic_auth(
    pass_store: None, basic_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    [(user, password)] = BASIC_USERS.items()
    store_in_pass(basic_registry.host, user, password)
    with client_from(tmp_path / "config.json", {"credsStore": "pass"}, basic_registry) as client:
        roundtrip(client, basic_registry)
    assert password not in logs.text


def test_cred_helpers_pass_against_token_auth(
    pass_store: None, token_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    [(user, password)] = TOKEN_USERS.items()
    store_in_pass(token_registry.host, user, password)
    doc: dict[str, object] = {"credHelpers": {token_registry.host: "pass"}}
    with client_from(tmp_path / "config.json", doc, token_registry) as client:
        roundtrip(client, token_registry)
    assert password not in logs.text


def test_a_host_pass_does_not_know_is_anonymous(
    pass_store: None, basic_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    store_in_pass("other.example", "alice", "elsewhere")
    store = CredentialStore.from_docker_config(_write(tmp_path, {"credsStore": "pass"}))
    assert store.get(basic_registry.host) is None
    assert not [r for r in logs.records if r.levelname == "WARNING"]


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path
