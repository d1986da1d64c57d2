"""The completion check through the real stack: an image whose newest index artifact is forged
(every span digest consistent with the real blob, so decode_index and span verification accept
it) is pulled lazily; once background fetch completes the layer fails its check: it is never
materialized, `lazysnap status` and the daemon's log flag it, reads on its mount fail with EIO,
and, also after a daemon restart, a later pull of the layer falls back to a full pull that
gives the image's real tree. A genuine index passes (tests/lazy/test_materialize_lazy.py).

Its own containerd and lazysnap daemon: background fetch on with a short quiet period, and
materialize on (the session daemon runs with background fetch off)."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import forge
from harness.containerd import Containerd, start_containerd
from harness.daemon import LazysnapDaemon, start_lazysnap
from harness.images import busybox_layer_tar, file, layer_tar, write_oci_layout
from harness.procs import unmount_all_under
from harness.registry import Registry
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.lazy_helpers import LazyStack, _concatenated, mount_log, unique_name

pytestmark = pytest.mark.stack
QUIET_SECONDS = 1
CHECK_TIMEOUT_S = 40.0
# These tests serve unsigned, forged indexes: the daemon opts in to permissive trust (the
# default, signed, never mounts them: tests/lazy/test_forgery_acceptance.py), which is where the
# completion check is the only line of defence.
TRUST_PERMISSIVE: tuple[str, ...] = ("[trust]", 'mode = "permissive"')
TEXT = b"".join(b"%06d a line of text that compresses well\n" % i for i in range(60000))
SECRET = hashlib.sha256(b"secret").digest() * 4096  # 128 KiB


def _config(base: Path, registry: Registry, hosts_dir: Path) -> Path:
    path = base / "config.toml"
    base.mkdir(parents=True, exist_ok=True)
    lines = [
        f'root = "{base / "root"}"',
        f'address = "{base / "lazysnap.sock"}"',
        "[remote]",
        f'hosts_dir = "{hosts_dir}"',
        f'plain_http = ["{registry.host}"]',
        "min_layer_size = 0",
        "fetch_timeout_seconds = 10",
        "[fetch]",
        "background = true",
        f"background_quiet_seconds = {QUIET_SECONDS}",
        "materialize = true",
        "[metrics]",
        'address = "127.0.0.1:0"',
        *TRUST_PERMISSIVE,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def own_stack(registry: Registry) -> Iterator[tuple[Containerd, LazysnapDaemon]]:
    base = Path(tempfile.mkdtemp(prefix="lzs-chk-", dir="/tmp"))  # short: unix socket paths
    containerd = start_containerd(
        base / "ctd",
        proxy_socket=base / "lazysnap" / "lazysnap.sock",
        registry_hosts=[registry.host],
    )
    try:
        config = _config(base / "lazysnap", registry, containerd.hosts_dir)
        daemon = start_lazysnap(base / "lazysnap", config=config)
    except BaseException:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    yield containerd, daemon
    containerd.stop()
    daemon.stop()
    unmount_all_under(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stack(
    own_stack: tuple[Containerd, LazysnapDaemon], registry: Registry, stack_base: Path
) -> Iterator[LazyStack]:
    containerd, daemon = own_stack
    workdir = Path(tempfile.mkdtemp(prefix="chk-", dir=stack_base))
    lazy = LazyStack(containerd, registry, daemon, unique_name("lzs-chk"), workdir)
    yield lazy
    remove_namespace_content(containerd, lazy.namespace)
    shutil.rmtree(workdir, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forgery:
    forge: Callable[[forge.IndexBlobs, bytes], forge.IndexBlobs]
    says: str  # what the daemon's verdict names


FORGERIES = {
    "remap": Forgery(
        lambda genuine, _: forge.remap(genuine, "data/secret", "etc/passwd"),
        "name is 'data/secret' in the index, 'etc/passwd' in the tar stream",
    ),
    "mode": Forgery(
        lambda genuine, _: forge.change_mode(genuine, "data/secret", 0o644),
        "'data/secret': mode is 0o644 in the index, 0o600 in the tar stream",
    ),
    "setuid-and-device": Forgery(
        lambda genuine, _: forge.add_setuid_and_device(genuine),
        "'usr/bin/forged-suid' (reg) is not in the layer",
    ),
    "added-path": Forgery(
        lambda genuine, _: forge.add_path(genuine),
        "'etc/anything' (reg) is not in the layer",
    ),
    "window": Forgery(
        lambda genuine, blob: forge.forge_window(genuine, blob)[0],
        "the uncompressed layer hashes to sha256:",
    ),
}


def _client(registry: Registry) -> RegistryClient:
    hosts = HostsConfig(None, plain_http=(registry.host,))
    return RegistryClient(hosts, CredentialStore.anonymous())


def _status(stack: LazyStack) -> dict[str, object]:
    out = stack.lazysnap("status", "--root", str(stack.daemon.root), "--json").stdout
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def _layer(stack: LazyStack, layer_digest: str) -> dict[str, object] | None:
    layers = _status(stack)["layers"]
    assert isinstance(layers, list)
    return next((layer for layer in layers if layer["layer_digest"] == layer_digest), None)


def _wait_for(
    condition: Callable[[], bool], seconds: float, what: str, detail: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f}s: {what}{detail()}")
        time.sleep(0.3)


def _completion_checks(stack: LazyStack) -> dict[str, float]:
    """lazysnap_completion_check_total by result, scraped from the daemon's metrics endpoint
    (the port it chose is in its log)."""
    [port] = re.findall(r"serving metrics on http://127\.0\.0\.1:(\d+)/", stack.daemon.log())[-1:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lazysnap_completion_check_total"
    }


def _read_errno(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno or 0
    return 0


def _containerd_reaches_daemon(stack: LazyStack) -> bool:
    listed = stack.containerd.ctr(
        "snapshots", "--snapshotter", "lazysnap", "ls", namespace=stack.namespace, check=False
    )
    return listed.returncode == 0


# -- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_a_forged_index_fails_the_completion_check_and_is_refused_for_good(
    stack: LazyStack, kind: str
) -> None:
    # One layer, its own (never shared with another test): busybox, compressible text (gzip
    # spans that reach back into their windows) and a 0600 file.
    tar = _concatenated(
        busybox_layer_tar(stack.workdir),
        layer_tar([file("data/text", TEXT), file("data/secret", SECRET, 0o600)]),
    )
    built = write_oci_layout(stack.workdir / "layout", "latest", [tar])
    image = stack.push(built, unique_name(f"test/forged-{kind}"))
    [layer] = built.layers
    layer_blob = (built.layout / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
    stack.index_build(image.reference, "--span-size", str(64 << 10))
    with _client(stack.registry) as client:
        genuine = forge.genuine_index(client, image.reference, layer.digest)
        forged = FORGERIES[kind].forge(genuine, layer_blob)
        artifact = forge.push_forged(client, image.reference, layer.digest, forged)

    log_from = stack.daemon_log_offset()
    failed_before = _completion_checks(stack).get("failed", 0)
    assert stack.pull(image.reference).lazy == 1
    mountpoint = stack.lazy_mount(layer.digest)
    _wait_for(
        lambda: (_layer(stack, layer.digest) or {}).get("completion_check") == "refused",
        CHECK_TIMEOUT_S,
        f"layer {layer.digest} refused",
        lambda: (
            f": {_layer(stack, layer.digest)}; daemon log:\n"
            + "\n".join(stack.daemon_log_since(log_from).splitlines()[-30:])
            + f"\nmount log:\n{mount_log(mountpoint)[-3000:]}"
        ),
    )
    status = _status(stack)
    shown = _layer(stack, layer.digest)
    assert shown is not None and shown["state"] != "local"  # never materialized
    assert FORGERIES[kind].says in str(shown["check_detail"])
    refusals = status["refused_indexes"]
    assert isinstance(refusals, list)
    [refused] = [r for r in refusals if r["index_digest"] == forged.index_digest]
    assert refused["artifact_digest"] == artifact and refused["image"] == image.reference
    log = stack.daemon_log_since(log_from)
    [line] = [x for x in log.splitlines() if "FAILED its completion check" in x]
    assert "ERROR" in line and layer.digest in line and forged.index_digest in line, line
    assert image.reference in line and FORGERIES[kind].says in line, line
    assert _completion_checks(stack)["failed"] == failed_before + 1
    # Reads on the mount fail closed, file data and directories alike.
    _wait_for(lambda: _read_errno(mountpoint / "data/text") == errno.EIO, 10, "EIO on the mount")
    assert _read_errno(mountpoint / "etc/passwd") == errno.EIO
    # A new container on the layer is refused, naming why.
    started = stack.run(image.reference, "true")
    assert started.returncode != 0 and "failed its completion check" in started.stderr, started

    # A restart changes nothing: the mount still refuses, and the ledger is on disk.
    stack.daemon.restart()
    _wait_for(lambda: _containerd_reaches_daemon(stack), 30, "containerd reaching lazysnap")
    assert _read_errno(mountpoint / "data/text") == errno.EIO
    assert (_layer(stack, layer.digest) or {}).get("completion_check") == "refused"

    # The layer's snapshot goes with the image; pulling it again falls back to a full pull of
    # the layer, whose tree is the image's own.
    stack.containerd.ctr("images", "rm", "--sync", image.reference, namespace=stack.namespace)
    _wait_for(lambda: _layer(stack, layer.digest) is None, 60, "the lazy layer removed")
    log_from = stack.daemon_log_offset()
    again = stack.pull(image.reference)
    assert (again.lazy, again.pulled) == (0, 1)
    [fallback] = stack.fallback_lines(log_from, layer.digest)
    assert f"index blob {forged.index_digest}" in fallback and "refused" in fallback, fallback
    script = "stat -c '%a %u' /data/secret; test -e /etc/anything && echo added || echo absent"
    assert stack.run_ok(image.reference, "sh", "-c", script) == "600 0\nabsent\n"
    digest = stack.run_ok(image.reference, "sha256sum", "/data/text").split()[0]
    assert digest == hashlib.sha256(TEXT).hexdigest()
