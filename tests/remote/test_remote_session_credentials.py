"""Credentials given with an image (a CRI PullImage's auth, remote/session_credentials.py) against
a real registry behind token auth: they serve their repository on their registry and nothing
else; each kind (user and password, identity token, registry token) works; a refusal says whose
credentials were refused and where they came from."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.procs import HarnessError
from harness.registry import Registry, TokenAuth, start_registry
from harness.token_issuer import TokenIssuer
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.errors import AuthenticationError
from snapshotter.remote.hosts import HostsConfig, normalize_host
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.session_credentials import PullAuth, SessionCredentials
from tests.remote.conftest import BASIC_USERS, TOKEN_USERS
from tests.remote.util import push_image

pytestmark = pytest.mark.stack

USER, PASSWORD = next(iter(TOKEN_USERS.items()))


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def pushed(registry: Registry, name: str) -> Reference:
    """An image pushed to registry/name with the token service's user (a client of its own)."""
    writer = RegistryClient(
        HostsConfig(plain_http=[registry.host]),
        CredentialStore({registry.host: Credentials(USER, PASSWORD)}),
        timeout=10,
        retries=1,
    )
    repo = Repository(registry.host, name)
    push_image(writer, repo, "v1", layer=os.urandom(1000))
    writer.close()
    return Reference(repo.registry, repo.name, tag="v1", tag_given=True)


def session_client(registry_hosts: list[str], given: dict[Reference, PullAuth]) -> RegistryClient:
    """A client whose node has no credentials, only those given with the images."""
    session = SessionCredentials(60.0)
    for ref, auth in given.items():
        session.put(normalize_host(ref.registry), ref.name, auth)
    store = CredentialStore()
    store.consult_first(session)
    return RegistryClient(HostsConfig(plain_http=registry_hosts), store, timeout=10, retries=1)


@pytest.fixture(scope="module")
def second_token_registry(
    own_dir: Callable[[str], Path], token_issuer: TokenIssuer
) -> Iterator[Registry]:
    auth = TokenAuth(token_issuer.realm, token_issuer.service, token_issuer.issuer,
                     token_issuer.cert_path)  # fmt: skip
    try:
        instance = start_registry(own_dir("token2"), token_auth=auth)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield instance
    instance.stop()


def test_given_credentials_serve_their_repository_only(
    token_registry: Registry, second_token_registry: Registry
) -> None:
    app = pushed(token_registry, unique("team/app"))
    neighbour = pushed(token_registry, unique("team/neighbour"))
    elsewhere = pushed(second_token_registry, app.name)
    client = session_client(
        [token_registry.host, second_token_registry.host], {app: PullAuth(USER, PASSWORD)}
    )
    assert client.get_manifest(app).layers
    with pytest.raises(AuthenticationError, match="anonymous access"):
        client.get_manifest(neighbour)
    # the same repository name on another registry: not theirs either
    with pytest.raises(AuthenticationError, match="anonymous access"):
        client.get_manifest(elsewhere)
    client.close()


def test_wrong_given_credentials_are_named_with_their_origin(token_registry: Registry) -> None:
    app = pushed(token_registry, unique("team/wrong"))
    client = session_client([token_registry.host], {app: PullAuth(USER, "not-" + PASSWORD)})
    with pytest.raises(AuthenticationError) as refused:
        client.get_manifest(app)
    message = str(refused.value)
    assert f"user {USER!r} (from the CRI PullImage of this image)" in message, message
    assert PASSWORD not in message
    client.close()


def test_an_identity_token_is_exchanged_at_the_token_service(
    token_registry: Registry, token_issuer: TokenIssuer
) -> None:
    app = pushed(token_registry, unique("team/identity"))
    refresh = "rt-" + secrets.token_hex(8)
    token_issuer.refresh_tokens[refresh] = USER
    client = session_client([token_registry.host], {app: PullAuth(identity_token=refresh)})
    before = len(token_issuer.issued)
    assert client.get_manifest(app).layers
    assert any(t.user == USER for t in token_issuer.issued[before:])
    client.close()
    unknown = session_client([token_registry.host], {app: PullAuth(identity_token="rt-bogus")})
    with pytest.raises(AuthenticationError, match="an identity token"):
        unknown.get_manifest(app)
    unknown.close()


def test_a_registry_token_is_sent_as_it_is(
    token_registry: Registry, token_issuer: TokenIssuer
) -> None:
    app = pushed(token_registry, unique("team/bearer"))
    bearer = token_issuer.sign(USER, (f"repository:{app.name}:pull",), token_issuer.service)
    client = session_client([token_registry.host], {app: PullAuth(registry_token=bearer)})
    before = len(token_issuer.issued)
    assert client.get_manifest(app).layers
    assert len(token_issuer.issued) == before, "a registry token needs no token service"
    client.close()


def test_a_basic_auth_refusal_names_the_given_credentials(basic_registry: Registry) -> None:
    user, password = next(iter(BASIC_USERS.items()))
    writer = RegistryClient(
        HostsConfig(plain_http=[basic_registry.host]),
        CredentialStore({basic_registry.host: Credentials(user, password)}),
        timeout=10,
        retries=1,
    )
    repo = Repository(basic_registry.host, unique("team/basic"))
    push_image(writer, repo, "v1", layer=os.urandom(1000))
    writer.close()
    app = Reference(repo.registry, repo.name, tag="v1", tag_given=True)
    right = session_client([basic_registry.host], {app: PullAuth(user, password)})
    assert right.get_manifest(app).layers
    right.close()
    wrong = session_client([basic_registry.host], {app: PullAuth(user, "not-" + password)})
    with pytest.raises(AuthenticationError) as refused:
        wrong.get_manifest(app)
    assert f"HTTP 401 for user {user!r} (from the CRI PullImage of this image)" in str(
        refused.value
    )
    wrong.close()
