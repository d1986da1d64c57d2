"""The real `docker-credential-pass` (Debian's golang-docker-credential-helpers) behind `pass`
and gpg, against docker-registry with Basic auth and with bearer token auth: a docker config
that names the helper (credsStore, or credHelpers for the host) is all the client is given."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.credential_pass import PassStore, pass_store
from harness.procs import HarnessError
from harness.registry import Registry
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from tests.remote.conftest import BASIC_USERS, TOKEN_USERS, LogRecorder
from tests.remote.test_remote_auth_registry import roundtrip

pytestmark = pytest.mark.stack


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> Iterator[PassStore]:
    try:
        with pass_store() as store:
            for name, value in store.env.items():
                monkeypatch.setenv(name, value)
            yield store
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


def client_from(config: Path, doc: dict[str, object], registry: Registry) -> RegistryClient:
    config.write_text(json.dumps(doc))
    return RegistryClient(
        HostsConfig(plain_http=[registry.host]),
        CredentialStore.from_docker_config(config),
        timeout=10,
        retries=1,
    )


def test_creds_store_pass_against_basic_auth(
    passwords: PassStore, basic_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    [(user, password)] = BASIC_USERS.items()
    passwords.store(basic_registry.host, user, password)
    with client_from(tmp_path / "config.json", {"credsStore": "pass"}, basic_registry) as client:
        roundtrip(client, basic_registry)
    assert password not in logs.text


def test_cred_helpers_pass_against_token_auth(
    passwords: PassStore, token_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    [(user, password)] = TOKEN_USERS.items()
    passwords.store(token_registry.host, user, password)
    doc: dict[str, object] = {"credHelpers": {token_registry.host: "pass"}}
    with client_from(tmp_path / "config.json", doc, token_registry) as client:
        roundtrip(client, token_registry)
    assert password not in logs.text


def test_a_host_pass_does_not_know_is_anonymous(
    passwords: PassStore, basic_registry: Registry, tmp_path: Path, logs: LogRecorder
) -> None:
    passwords.store("other.example", "alice", "elsewhere")
    store = CredentialStore.from_docker_config(_write(tmp_path, {"credsStore": "pass"}))
    assert store.get(basic_registry.host) is None
    assert not [r for r in logs.records if r.levelname == "WARNING"]


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path
