"""Challenge parsing, docker config.json reading and the token cache, without a server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from snapshotter.remote.auth import Authenticator, parse_www_authenticate
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.errors import CredentialsError


def test_parse_bearer_and_basic_challenges() -> None:
    [bearer] = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    both = parse_www_authenticate('Basic realm="peryx", Bearer realm="r",service=s')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert both[1].params == {"realm": "r", "service": "s"}


def test_docker_config_auth_and_username_password(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"hub:pw:with:colons").decode()
                    },
                    "127.0.0.1:5000": {"username": "u", "password": "p"},
                    "ghcr.io": {"identitytoken": "opaque"},
                }
            }
        )
    )
    store = CredentialStore.from_docker_config(config)
    assert store.get("registry-1.docker.io") == Credentials("hub", "pw:with:colons")
    assert store.get("http://127.0.0.1:5000") == Credentials("u", "p")
    assert store.get("ghcr.io") is None
    assert "pw:with" not in repr(store.get("docker.io"))


def test_missing_config_is_anonymous_and_bad_config_names_the_file(tmp_path: Path) -> None:
    assert CredentialStore.from_docker_config(tmp_path / "absent.json").get("x.io") is None
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CredentialsError, match=str(bad)):
        CredentialStore.from_docker_config(bad)
    bad.write_text(json.dumps({"auths": {"r.io": {"auth": "!!!"}}}))
    with pytest.raises(CredentialsError, match=r"auths\['r.io'\].auth"):
        CredentialStore.from_docker_config(bad)


def test_token_is_cached_per_scope_and_refreshed_before_expiry() -> None:
    now = [1000.0]
    fetched: list[tuple[str, ...]] = []

    def fetch(realm: str, service: str | None, scopes: object, creds: object) -> tuple[str, float]:
        fetched.append(tuple(scopes))  # type: ignore[arg-type]
        return f"tok{len(fetched)}", 60.0

    auth = Authenticator(CredentialStore(), clock=lambda: now[0], fetch_token=fetch)
    challenge = 'Bearer realm="http://issuer/token",service="svc"'
    pull = ["repository:a:pull"]
    assert auth.challenge("r.io", pull, challenge, None) == "Bearer tok1"
    assert auth.authorization("r.io", pull) == "Bearer tok1"
    assert auth.authorization("r.io", ["repository:b:pull"]) == "Bearer tok2"  # other scope
    now[0] += 55  # inside the refresh margin (10 % of 60 s)
    assert auth.authorization("r.io", pull) == "Bearer tok3"
    # A 401 for a token we sent replaces it even though it has not expired yet.
    assert auth.challenge("r.io", pull, challenge, "Bearer tok3") == "Bearer tok4"
    assert fetched == [tuple(pull), ("repository:b:pull",), tuple(pull), tuple(pull)]
