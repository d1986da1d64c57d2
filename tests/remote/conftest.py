"""Fixtures for the registry client tests: clients for the session registry, peryx, and
registries behind basic or token auth."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.peryx import Peryx, start_peryx
from harness.procs import HarnessError
from harness.registry import Registry, TokenAuth, start_registry
from harness.token_issuer import TokenIssuer
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.hosts import HostsConfig

MakeClient = Callable[..., RegistryClient]


class LogRecorder(logging.Handler):
    """Every log record at DEBUG and up, independent of pytest's logging plugin (the project's
    full run uses `-p no:logging`, which removes caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)

    def at_level(self, level: int, logger: str | None = None) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # records everything already; kept for readability


@pytest.fixture
def logs() -> Iterator[LogRecorder]:
    root = logging.getLogger()
    old_level = root.level
    recorder = LogRecorder()
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    yield recorder
    root.removeHandler(recorder)
    root.setLevel(old_level)


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """RegistryClient factory speaking plain http to the given hosts; closed after the test."""
    made: list[RegistryClient] = []

    def make(
        *hosts: str, credentials: CredentialStore | None = None, **kwargs: object
    ) -> RegistryClient:
        options: dict[str, object] = {"timeout": 10.0, "retries": 2, "backoff": 0.05}
        options.update(kwargs)
        client = RegistryClient(HostsConfig(plain_http=hosts), credentials, **options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(registry: Registry, make_client: MakeClient) -> RegistryClient:
    return make_client(registry.host)


@pytest.fixture(scope="module")
def own_dir() -> Iterator[Callable[[str], Path]]:
    """Fresh directories under /tmp for servers' data, removed (not retained) afterwards."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=f"lzs-remote-{prefix}-", dir="/tmp")))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def peryx_server() -> Iterator[Peryx]:
    base = Path(tempfile.mkdtemp(prefix="lzs-remote-peryx-", dir="/tmp"))
    try:
        server = start_peryx(base)
    except HarnessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def peryx_client(peryx_server: Peryx, make_client: MakeClient) -> RegistryClient:
    creds = CredentialStore({peryx_server.host: Credentials("lazysnap", peryx_server.token)})
    return make_client(peryx_server.host, credentials=creds)


BASIC_USERS = {"alice": "wonder-Land-7"}


@pytest.fixture(scope="module")
def basic_registry(own_dir: Callable[[str], Path]) -> Iterator[Registry]:
    try:
        instance = start_registry(own_dir("basic"), basic_auth=BASIC_USERS)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield instance
    instance.stop()


TOKEN_USERS = {"bob": "builder-Secret-42"}


@pytest.fixture(scope="module")
def token_issuer(own_dir: Callable[[str], Path]) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer(own_dir("issuer"), users=dict(TOKEN_USERS)).start()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def token_registry(own_dir: Callable[[str], Path], token_issuer: TokenIssuer) -> Iterator[Registry]:
    auth = TokenAuth(
        realm=token_issuer.realm,
        service=token_issuer.service,
        issuer=token_issuer.issuer,
        rootcertbundle=token_issuer.cert_path,
    )
    try:
        instance = start_registry(own_dir("token"), token_auth=auth)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield instance
    instance.stop()


def write_docker_config(path: Path, auths: dict[str, dict[str, str]], **extra: object) -> Path:
    path.write_text(json.dumps({"auths": auths, **extra}))
    return path
