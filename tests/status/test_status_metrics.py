"""The Prometheus endpoint: Prepare outcomes counted in the daemon layer, fallbacks classed by
reason, and the daemon serving it when (and only when) [metrics] address is set."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.core.errors import AlreadyExists
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.metrics import DaemonMetrics, fallback_reason
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import IndexDiscovery
from snapshotter.trust.policy import TrustPolicy
from tests.fs.fs_helpers import Member, built_index, compress, make_tar
from tests.unit.spine_helpers import NAMESPACE, DaemonProcess, serve_command, start_daemon

LAYER = "sha256:" + "ab" * 32


def labels(target: str, image: str = "127.0.0.1:5000/test/app:1") -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": target,
        "containerd.io/snapshot/cri.layer-digest": LAYER,
        "containerd.io/snapshot/cri.image-ref": image,
    }


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def prepares(samples: Mapping[Any, float], outcome: str, reason: str = "") -> float:
    return samples.get(("lazysnap_prepares_total", (("outcome", outcome), ("reason", reason))), 0.0)


def starting(samples: Mapping[Any, float]) -> float:
    return samples[("lazysnap_lazy_layers_starting", ())]


def settled_scrape(port: int, timeout: float = 10.0) -> dict[tuple[str, Any], float]:
    """A scrape once no lazily answered Prepare is still waiting for its mount's outcome."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if starting(samples) == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


class ScriptedRemoteLayers:
    """A RemoteLayers whose next mount fails with a given reason, or "mounts" (records it);
    the core cannot tell the difference, which is what these tests need."""

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None
        self.mounted: set[str] = set()

    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.mounted.add(mountpoint)

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        if mountpoint not in self.mounted:
            raise RemoteLayerUnavailable("not mounted")

    def unmount(self, mountpoint: str) -> None:
        self.mounted.discard(mountpoint)


@pytest.fixture
def metered(workdir: Path) -> Iterator[tuple[Snapshotter, ScriptedRemoteLayers, DaemonMetrics]]:
    root = workdir / "root"
    metrics = DaemonMetrics(str(root), str(root / "cache"), 1 << 30)
    remote = ScriptedRemoteLayers()
    core = metrics.snapshotter(str(root), remote)
    metrics.serve("127.0.0.1:0")
    yield core, remote, metrics
    metrics.stop()
    core.close()


def test_the_endpoint_counts_lazy_fallback_and_ordinary_prepares(
    metered: tuple[Snapshotter, ScriptedRemoteLayers, DaemonMetrics],
) -> None:
    core, remote, metrics = metered
    before = scrape(metrics.port)
    assert prepares(before, "lazy") == prepares(before, "ordinary") == 0

    with pytest.raises(AlreadyExists):
        core.prepare("extract-1", "", labels("chain-1"))
    remote.fail_with = RemoteLayerUnavailable(
        f"no lazysnap index for layer {LAYER} of x", FallbackReason.NO_INDEX
    )
    core.prepare("extract-2", "", labels("chain-2"))
    remote.fail_with = KeyError("a bug in the lazy path")
    core.prepare("extract-3", "", labels("chain-3"))
    core.prepare("container", "chain-1")  # a container's rootfs: no lazy layer asked for
    # chain-1 exists already: containerd is told so, but no layer was mounted or pulled.
    with pytest.raises(AlreadyExists):
        core.prepare("extract-4", "", labels("chain-1"))

    after = settled_scrape(metrics.port)
    assert prepares(after, "lazy") == 1
    assert prepares(after, "fallback", "no_index") == 1
    assert prepares(after, "fallback", "internal_error") == 1
    assert prepares(after, "ordinary") == 1
    assert sum(v for (name, _), v in after.items() if name == "lazysnap_prepares_total") == 4
    assert not [name for name, _ in after if name.endswith("_created")]  # no noise series
    # Scrape-time figures are there even before any mount process ran.
    assert after[("lazysnap_lazy_layers_mounted", ())] == 0
    assert after[("lazysnap_cache_max_bytes", ())] == 1 << 30
    assert after[("lazysnap_cache_bytes", ())] == 0


class StartingRemoteLayers(ScriptedRemoteLayers):
    """mount() returns while the mount is still starting, as the daemon's background mounts do;
    check() waits for the start, which the test lets succeed or fail per mountpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, threading.Event] = {}
        self.fails: set[str] = set()

    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        super().mount(mountpoint, labels)
        self.started[mountpoint] = threading.Event()

    def finish(self, mountpoint: str, *, ok: bool) -> None:
        if not ok:
            self.fails.add(mountpoint)
            self.mounted.discard(mountpoint)
        self.started[mountpoint].set()

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        if not self.started[mountpoint].wait(30):
            raise RemoteLayerUnavailable("test: mount never finished starting")
        if mountpoint in self.fails:
            raise RemoteLayerUnavailable(
                f"mounting lazy layer at {mountpoint}: process exited", FallbackReason.MOUNT
            )
        super().check(mountpoint, labels)


def test_a_lazy_prepare_counts_once_its_background_mount_is_live_or_failed(
    workdir: Path,
) -> None:
    root = workdir / "root"
    metrics = DaemonMetrics(str(root), str(root / "cache"), 1 << 30)
    remote = StartingRemoteLayers()
    core = metrics.snapshotter(str(root), remote)
    metrics.serve("127.0.0.1:0")
    try:
        for number in (1, 2):
            with pytest.raises(AlreadyExists):  # answered at once: the mount is starting
                core.prepare(f"extract-{number}", "", labels(f"chain-{number}"))
        first, second = sorted(remote.started)
        samples = scrape(metrics.port)
        assert prepares(samples, "lazy") == 0 and starting(samples) == 2

        remote.finish(first, ok=True)
        remote.finish(second, ok=False)
        samples = settled_scrape(metrics.port)
        assert starting(samples) == 0
        assert prepares(samples, "lazy") == 1
        assert prepares(samples, "lazy_failed", "mount") == 1
    finally:
        for event in remote.started.values():
            event.set()
        metrics.stop()
        core.close()


def test_a_real_background_mount_that_fails_to_start_counts_as_lazy_failed(
    workdir: Path,
) -> None:
    """The daemon's manager, mounting in the background: the mount process starts, then exits
    (its blob is missing) after the Prepare has answered."""
    blob = compress(make_tar([Member("etc/motd", data=b"hello\n")]), "gzip")
    index = built_index(blob, "gzip")
    missing = workdir / "gone.tar.gz"
    spec = LayerSpec(
        blob=BlobSpec("file", str(missing), index.layer_digest), index_bytes=encode_index(index)
    )
    layers = LazyLayers(
        LazyLayerSettings(str(workdir / "cache"), 1 << 20, mount_in_background=True),
        resolve=lambda _labels: spec,
    )
    root = workdir / "root"
    metrics = DaemonMetrics(str(root), str(root / "cache"), 1 << 30)
    core = metrics.snapshotter(str(root), layers)
    metrics.serve("127.0.0.1:0")
    try:
        with pytest.raises(AlreadyExists):
            core.prepare("extract-1", "", labels("chain-1"))
        samples = settled_scrape(metrics.port, timeout=60)
        assert prepares(samples, "lazy") == 0
        assert prepares(samples, "lazy_failed", "mount") == 1
    finally:
        metrics.stop()
        core.close()


def unreachable_registry() -> str:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def reason_of_real_mount(layers: LazyLayers, mountpoint: Path, labels: Mapping[str, str]) -> str:
    with pytest.raises(RemoteLayerUnavailable) as raised:
        layers.mount(str(mountpoint), labels)
    return fallback_reason(raised.value)


def test_fallback_reasons_of_the_real_lazy_path_are_classed(workdir: Path) -> None:
    """The messages and exception chains that discovery and the manager really raise."""
    registry = unreachable_registry()
    discovery = IndexDiscovery(
        RegistryClient(
            HostsConfig(None, plain_http=(registry,)), CredentialStore.from_docker_config(None)
        ),
        RegistryAccess(plain_http=(registry,)),
        trust=TrustPolicy(),  # the default: signed, and no key
    )
    layers = LazyLayers(LazyLayerSettings(str(workdir / "cache"), 1 << 20), resolve=discovery)
    mountpoint = workdir / "fs"
    mountpoint.mkdir()

    no_image = {"containerd.io/snapshot.ref": "chain"}  # what ctr sends: no image, no layer
    assert reason_of_real_mount(layers, mountpoint, no_image) == "labels"
    down = labels("chain", image=f"{registry}/test/app:1")
    assert reason_of_real_mount(layers, mountpoint, down) == "registry"
    no_resolver = LazyLayers(LazyLayerSettings(str(workdir / "cache"), 1 << 20))
    assert reason_of_real_mount(no_resolver, mountpoint, down) == "disabled"
    assert fallback_reason(ValueError("not a RemoteLayerUnavailable")) == "internal_error"


# -- the daemon ------------------------------------------------------------------------------


def start_with_config(
    workdir: Path, daemons: list[DaemonProcess], config_text: str
) -> DaemonProcess:
    config = workdir / "config.toml"
    config.write_text(config_text)
    daemon = start_daemon(
        workdir / "root", workdir / "lazysnap.sock", workdir / "daemon.log", "--config", str(config)
    )
    daemons.append(daemon)
    return daemon


def metrics_port(daemon: DaemonProcess) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log)
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in the log: {daemon.log}")


def test_serve_exposes_metrics_when_an_address_is_configured(
    workdir: Path, daemons: list[DaemonProcess]
) -> None:
    daemon = start_with_config(
        workdir, daemons, '[remote]\nenable = false\n[metrics]\naddress = "127.0.0.1:0"\n'
    )
    port = metrics_port(daemon)
    md = (("containerd-namespace", NAMESPACE),)
    daemon.stub.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=md)
    # Remote layers are off: a Prepare naming a target is an ordinary snapshot too.
    daemon.stub.Prepare(pb.PrepareSnapshotRequest(key="b", labels=labels("c")), metadata=md)
    samples = scrape(port)
    assert prepares(samples, "ordinary") == 2
    assert samples[("lazysnap_lazy_layers_mounted", ())] == 0
    assert ("process_resident_memory_bytes", ()) in samples
    assert daemon.stop() == 0
    with pytest.raises(OSError):  # the endpoint goes with the daemon
        scrape(port)


def test_serve_without_a_metrics_address_serves_none(
    workdir: Path, daemons: list[DaemonProcess]
) -> None:
    daemon = start_with_config(workdir, daemons, "[remote]\nenable = false\n")
    assert "metrics" not in daemon.log
    assert daemon.stop() == 0


def test_a_bad_metrics_address_stops_serve_with_a_clear_error(workdir: Path) -> None:
    config = workdir / "config.toml"
    config.write_text('[metrics]\naddress = "localhost"\n')
    result = subprocess.run(
        [*serve_command(workdir / "root", workdir / "s.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "metrics.address 'localhost'" in result.stderr and "host:port" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "root").exists()


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "10.1.2.3:9199", "metrics.lan:9199"])
def test_a_metrics_address_reaching_the_network_needs_an_opt_in(
    workdir: Path, address: str
) -> None:
    config = workdir / "config.toml"
    config.write_text(f'[metrics]\naddress = "{address}"\n')
    result = subprocess.run(
        [*serve_command(workdir / "root", workdir / "s.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"metrics.address {address!r} is not loopback" in result.stderr
    assert "allow_non_loopback = true" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "root").exists()


def test_a_non_loopback_metrics_address_with_the_opt_in_is_served_and_logged(
    workdir: Path, daemons: list[DaemonProcess]
) -> None:
    daemon = start_with_config(
        workdir,
        daemons,
        '[remote]\nenable = false\n[metrics]\naddress = "0.0.0.0:0"\nallow_non_loopback = true\n',
    )
    deadline = time.monotonic() + 10
    while "serving metrics on" not in daemon.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "metrics on 0.0.0.0:0, not loopback (metrics.allow_non_loopback = true)" in daemon.log
    served = re.search(r"serving metrics on http://[^:]+:(\d+)/metrics", daemon.log)
    assert served is not None, daemon.log
    assert ("process_resident_memory_bytes", ()) in scrape(int(served[1]))
    assert daemon.stop() == 0


def test_a_taken_metrics_port_stops_serve_and_leaves_nothing_behind(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = workdir / "config.toml"
        config.write_text(f'[remote]\nenable = false\n[metrics]\naddress = "{address}"\n')
        result = subprocess.run(
            [*serve_command(workdir / "root", workdir / "s.sock"), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot serve metrics on {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "s.sock").exists()
