"""Auth against real registries: docker-registry with htpasswd Basic auth, and with bearer
token auth from a token issuer run by the test (harness/token_issuer.py). Credentials
come from a docker config.json; tokens that expire are refreshed; no secret reaches a log."""

from __future__ import annotations

import base64
import logging
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from harness.registry import Registry
from harness.registry_calls import list_tags
from harness.token_issuer import TokenIssuer
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.errors import AuthenticationError
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import sha256_digest
from snapshotter.remote.reference import Reference, Repository
from tests.remote.conftest import BASIC_USERS, TOKEN_USERS, LogRecorder, write_docker_config
from tests.remote.util import push_image

pytestmark = pytest.mark.stack


def config_client(
    registry: Registry, path: Path, user: str, password: str, *, as_auth: bool = True
) -> RegistryClient:
    entry = (
        {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        if as_auth
        else {"username": user, "password": password}
    )
    write_docker_config(path, {f"http://{registry.host}": entry})
    return RegistryClient(
        HostsConfig(plain_http=[registry.host]),
        CredentialStore.from_docker_config(path),
        timeout=10,
        retries=1,
    )


def roundtrip(client: RegistryClient, registry: Registry) -> None:
    """Push an image, read it back by tag, and Range-read its layer."""
    repo = Repository(registry.host, f"test/auth-{uuid.uuid4().hex[:8]}")
    layer = os.urandom(10_000)
    push_image(client, repo, "v1", layer=layer)
    manifest = client.get_manifest(Reference(repo.registry, repo.name, tag="v1", tag_given=True))
    assert manifest.layers[0].digest == sha256_digest(layer)
    with BlobReader(client, repo, sha256_digest(layer), len(layer)) as reader:
        assert reader.read(100, 100) == layer[100:200]


def statuses_since(registry: Registry, offset: int) -> list[int]:
    text = registry.log_path.read_bytes()[offset:].decode(errors="replace")
    return [int(m) for m in re.findall(r'HTTP/1\.1" (\d{3}) ', text)]


def test_basic_auth_from_docker_config(basic_registry: Registry, tmp_path: Path) -> None:
    [(user, password)] = BASIC_USERS.items()
    with config_client(basic_registry, tmp_path / "config.json", user, password) as client:
        roundtrip(client, basic_registry)
    with config_client(
        basic_registry, tmp_path / "c2.json", user, password, as_auth=False
    ) as client:
        roundtrip(client, basic_registry)


def test_basic_auth_refusals_name_user_and_host(basic_registry: Registry, tmp_path: Path) -> None:
    repo = Repository(basic_registry.host, "test/private")
    refused = f"http://{basic_registry.host}: HTTP 401 for user 'alice'"
    with (
        config_client(basic_registry, tmp_path / "config.json", "alice", "wrong") as client,
        pytest.raises(AuthenticationError, match=refused),
    ):
        list_tags(client, repo)
    with (
        RegistryClient(HostsConfig(plain_http=[basic_registry.host])) as anonymous,
        pytest.raises(AuthenticationError, match="anonymous access"),
    ):
        list_tags(anonymous, repo)


def test_token_auth_with_scopes(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    [(user, password)] = TOKEN_USERS.items()
    before = len(token_issuer.issued)
    with config_client(token_registry, tmp_path / "config.json", user, password) as client:
        roundtrip(client, token_registry)
    issued = token_issuer.issued[before:]
    assert issued and all(t.user == user for t in issued)
    scopes = {s for t in issued for s in t.scopes}
    assert any(s.endswith(":pull,push") for s in scopes) and any(
        s.endswith(":pull") for s in scopes
    )


def test_token_refusals(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    repo = Repository(token_registry.host, "test/private")
    refused = r"token service http://127.0.0.1:\d+/token refused credentials of user 'bob'"
    with (
        config_client(token_registry, tmp_path / "config.json", "bob", "wrong") as client,
        pytest.raises(AuthenticationError, match=refused),
    ):
        list_tags(client, repo)
    with (
        RegistryClient(HostsConfig(plain_http=[token_registry.host])) as anonymous,
        pytest.raises(AuthenticationError, match="refused anonymous access"),
    ):
        list_tags(anonymous, repo)


def test_token_expiring_mid_sequence_is_refreshed_on_401(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    """The registry stops accepting the token after ~3 s while the client was told 300 s: the
    next request gets a 401, the client fetches a new token and carries on."""
    [(user, password)] = TOKEN_USERS.items()
    token_issuer.registry_lifetime, token_issuer.expires_in = 3, 300
    try:
        with config_client(token_registry, tmp_path / "config.json", user, password) as client:
            repo = Repository(token_registry.host, f"test/exp-{uuid.uuid4().hex[:8]}")
            layer = os.urandom(5000)
            push_image(client, repo, "v1", layer=layer)
            reader = BlobReader(client, repo, sha256_digest(layer), len(layer))
            assert reader.read(0, 10) == layer[:10]
            issued_before = len(token_issuer.issued)
            time.sleep(4.5)
            offset = token_registry.log_offset()
            assert reader.read(10, 10) == layer[10:20]  # urllib3 data plane
            assert list_tags(client, repo) == ["v1"]  # httpx control plane
            reader.close()
        assert statuses_since(token_registry, offset).count(401) >= 1
        assert len(token_issuer.issued) > issued_before
    finally:
        token_issuer.registry_lifetime, token_issuer.expires_in = 300, 300


def test_token_is_refreshed_before_it_expires(
    token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    """Told expires_in=2, the client fetches a new token before using an old one: no 401."""
    [(user, password)] = TOKEN_USERS.items()
    token_issuer.expires_in = 2
    try:
        with config_client(token_registry, tmp_path / "config.json", user, password) as client:
            repo = Repository(token_registry.host, f"test/pre-{uuid.uuid4().hex[:8]}")
            push_image(client, repo, "v1")
            list_tags(client, repo)
            issued_before = len(token_issuer.issued)
            offset = token_registry.log_offset()
            time.sleep(2.2)
            assert list_tags(client, repo) == ["v1"]
        assert len(token_issuer.issued) == issued_before + 1
        assert 401 not in statuses_since(token_registry, offset)
    finally:
        token_issuer.expires_in = 300


def test_no_credential_or_token_in_any_log_line(
    basic_registry: Registry,
    token_registry: Registry,
    token_issuer: TokenIssuer,
    tmp_path: Path,
    logs: LogRecorder,
) -> None:
    before = len(token_issuer.issued)
    with logs.at_level(logging.DEBUG):
        for registry, users in ((basic_registry, BASIC_USERS), (token_registry, TOKEN_USERS)):
            [(user, password)] = users.items()
            with config_client(
                registry, tmp_path / f"{registry.port}.json", user, password
            ) as client:
                roundtrip(client, registry)
                with pytest.raises(AuthenticationError) as info:
                    list_tags(
                        config_client(registry, tmp_path / "bad.json", user, password + "-wrong"),
                        Repository(registry.host, "test/x"),
                    )
                logging.getLogger("test").error("refused: %s", info.value)
    tokens = [t.token for t in token_issuer.issued[before:]]
    assert tokens
    secrets = [p for p in (*BASIC_USERS.values(), *TOKEN_USERS.values())]
    secrets += [
        base64.b64encode(f"{u}:{p}".encode()).decode()
        for u, p in (*BASIC_USERS.items(), *TOKEN_USERS.items())
    ]
    secrets += tokens + [t.split(".")[2] for t in tokens]
    assert len(logs.records) > 5  # the client did log at DEBUG (httpx, urllib3, ours)
    text = logs.text + "\n".join(r.getMessage() for r in logs.records)
    for secret in secrets:
        assert secret not in text
