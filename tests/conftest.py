"""Session fixtures for the real stack (harness) and handling of the `stack` mark.

Tests marked `stack` need root and the real programs; they are skipped, with the reason, when
either is missing - unless LAZYSNAP_REQUIRE_STACK=1 (scripts/test.sh, CI), where a missing
piece is an error instead of a silent skip.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `harness` is imported as a package from the root

from harness.containerd import Containerd, start_containerd  # noqa: E402
from harness.daemon import (  # noqa: E402
    DaemonSettings,
    LazysnapDaemon,
    serve_available,
    start_lazysnap,
)
from harness.images import PushedImage, build_busybox, push, read_layout  # noqa: E402
from harness.procs import HarnessError, log_tail, unmount_all_under  # noqa: E402
from harness.registry import Registry, start_registry  # noqa: E402
from harness.trust import SigningKeys, make_keys, sign_builds_with  # noqa: E402

STACK_BINARIES = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "dpkg-deb", "umount")
TEST_IMAGES = Path(os.environ.get("LAZYSNAP_TEST_IMAGES", "/var/cache/lazysnap-test-images"))
_logs_for_failures: list[tuple[str, Path]] = []  # shown under a failing stack test
# The session daemon's span cache limit: smaller than pybig (178 MB compressed, 533 MB of tar),
# so reading a whole lazily pulled pybig must evict (tests/lazy checks it stays under).
SESSION_CACHE_MAX_BYTES = 160 << 20
# Short, so a dead registry turns into EIO quickly (tests/lazy); loopback spans take ms.
SESSION_FETCH_TIMEOUT_S = 5.0


def stack_required() -> bool:
    return os.environ.get("LAZYSNAP_REQUIRE_STACK") == "1"


def stack_missing() -> str | None:
    """Why the real stack cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (containerd, mounts, runc)"
    missing = [name for name in STACK_BINARIES if shutil.which(name) is None]
    if missing:
        return f"missing programs: {', '.join(missing)} (run scripts/install-deps.sh)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = stack_missing()
    if reason is None:
        return
    if stack_required() and any(item.get_closest_marker("stack") for item in items):
        raise pytest.UsageError(f"LAZYSNAP_REQUIRE_STACK=1 but the stack cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"stack test: {reason}")
    for item in items:
        if item.get_closest_marker("stack"):
            item.add_marker(skip)


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip normally; fail when the stack is required (CI must not pass by skipping)."""
    if stack_required():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def skip_or_fail() -> Callable[[str], NoReturn]:
    """For tests with their own prerequisites: skip(reason), or fail under
    LAZYSNAP_REQUIRE_STACK=1."""
    return _skip_or_fail


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and item.get_closest_marker("stack"):
        for name, path in _logs_for_failures:
            report.sections.append((f"{name} log (tail) {path}", log_tail(path, 60)))


@pytest.fixture(scope="session")
def stack_base() -> Iterator[Path]:
    """One short temp dir for the session's stack (unix socket paths must stay < 108 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="lzs-", dir="/tmp"))
    yield base
    unmount_all_under(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(stack_base: Path) -> Iterator[Registry]:
    """docker-registry 2.8 on a free loopback port (no auth); see Registry.blob_fetches."""
    try:
        instance = start_registry(stack_base / "registry")
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    _logs_for_failures.append(("registry", instance.log_path))
    yield instance
    instance.stop()


@pytest.fixture(scope="session", autouse=True)
def index_signing_keys() -> Iterator[SigningKeys]:
    """The session's index signing key pair: every `index build` / `accel serve` signs with it
    ($LAZYSNAP_SIGN_KEY) and the session daemon trusts it, so the suite runs the daemon's
    secure default (`[trust] mode = "signed"`). Trust tests make other keys of their own."""
    directory = Path(tempfile.mkdtemp(prefix="lzs-keys-"))
    keys = make_keys(directory)
    sign_builds_with(keys)
    yield keys
    shutil.rmtree(directory, ignore_errors=True)


def containerd_hosts_dir(stack_base: Path) -> Path:
    """The session containerd's hosts dir (start_containerd writes it under its base)."""
    return stack_base / "containerd" / "certs.d"


@pytest.fixture(scope="session")
def _lazysnap_session(
    stack_base: Path, registry: Registry, index_signing_keys: SigningKeys
) -> Iterator[LazysnapDaemon | str]:
    """The session daemon, or why it could not start (so overlayfs-only tests still run).

    Configured for lazy layers from the session registry (plain http), with containerd's hosts
    dir (so a test can route a registry of its own through hosts.toml), every indexed layer
    lazy whatever its size (when signed by the session key), a short fetch timeout and a span
    cache smaller than pybig."""
    reason = serve_available()
    if reason is not None:
        yield reason
        return
    settings = DaemonSettings(
        hosts_dir=containerd_hosts_dir(stack_base),
        plain_http=(registry.host,),
        min_layer_size=0,
        fetch_timeout_seconds=SESSION_FETCH_TIMEOUT_S,
        cache_max_bytes=SESSION_CACHE_MAX_BYTES,
        # Off: tests assert what a lazy mount fetches on demand (and that a file nobody read is
        # not fetched yet); a background download of whole layers would race them.
        background_fetch=False,
        trust_public_keys=(index_signing_keys.public,),
    )
    try:
        daemon = start_lazysnap(stack_base / "lazysnap", settings=settings)
    except HarnessError as exc:
        yield str(exc)
        return
    _logs_for_failures.append(("lazysnap", daemon.log_path))
    yield daemon
    returncode = daemon.stop()
    if returncode not in (0, None):
        pytest.fail(
            f"lazysnap serve exited {returncode} on SIGTERM; log {daemon.log_path}:\n"
            f"{log_tail(daemon.log_path)}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def containerd(
    stack_base: Path, registry: Registry, _lazysnap_session: LazysnapDaemon | str
) -> Iterator[Containerd]:
    """containerd 1.6 with `[proxy_plugins.lazysnap]` on the session daemon's socket, the CRI
    plugin on (snapshotter lazysnap, snapshot annotations passed), and a hosts dir making the
    test registry plain http. Torn down before the daemon (it may hold mounts on its layers)."""
    try:
        instance = start_containerd(
            stack_base / "containerd",
            proxy_socket=stack_base / "lazysnap" / "lazysnap.sock",
            registry_hosts=[registry.host],
            cri=True,
        )
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    _logs_for_failures.append(("containerd", instance.service.log_path))
    yield instance
    instance.stop()


@pytest.fixture
def lazysnap(_lazysnap_session: LazysnapDaemon | str) -> LazysnapDaemon:
    """The session's `lazysnap serve`, running (restarted if an earlier test killed it)."""
    if isinstance(_lazysnap_session, str):
        _skip_or_fail(f"lazysnap daemon unavailable: {_lazysnap_session}")
    if not _lazysnap_session.alive():
        _lazysnap_session.start()
    return _lazysnap_session


@pytest.fixture(scope="session")
def busybox_image(stack_base: Path, registry: Registry) -> PushedImage:
    """busybox-static as a 1-layer gzip OCI image, pushed as <registry>/test/busybox:latest."""
    try:
        built = build_busybox(stack_base / "images" / "busybox")
        return push(built, registry.host, "test/busybox", "latest")
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def pybig_image(registry: Registry) -> PushedImage:
    """The cached big image (scripts/build-test-images.sh), pushed as test/pybig:latest."""
    layout = TEST_IMAGES / "pybig"
    if not (layout / ".complete").exists():
        _skip_or_fail(f"{layout} is not built: run scripts/build-test-images.sh")
    try:
        return push(read_layout(layout, "latest"), registry.host, "test/pybig", "latest")
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
