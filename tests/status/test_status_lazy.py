"""`lazysnap status` and the scrape-time metrics on a root with a real lazy layer: the core
mounts it through the real FUSE mount process, from a local HTTP server answering Range."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.url_blob import served_blob_spec
from snapshotter.config import CacheConfig, Config
from snapshotter.core.errors import AlreadyExists
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.cache import HEADER_SIZE
from snapshotter.index.codec import encode_index
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import spans_for_range
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.metrics import LazyLayerCollector
from snapshotter.sidecars import (
    LocalMarker,
    read_state,
    remove_failure,
    remove_marker,
    write_failure,
    write_marker,
)
from snapshotter.status.collect import collect_status
from snapshotter.status.model import DEAD, LIVE, UNMOUNTED, LayerStatus
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members

# Background fetching of whole layers would add to the exact figures these tests check.
NO_BACKGROUND = BackgroundSettings(enabled=False)

pytestmark = pytest.mark.stack
TARGET = "status-tests/1/sha256:" + "cd" * 32
READ_FILE = "usr/lib/big.bin"


@dataclass
class LazyRoot:
    root: Path
    config: Config
    core: Snapshotter
    layers: LazyLayers
    server: BlobServer
    index: LayerIndex
    blob: bytes


@pytest.fixture
def lazy_root(workdir: Path) -> Iterator[LazyRoot]:
    blob = compress(make_tar(rich_members()), "zstd")
    index = built_index(blob, "zstd")
    server = BlobServer(blob)
    root = workdir / "root"
    config = Config(root=str(root), cache=CacheConfig(max_size_bytes=64 << 20))
    spec = LayerSpec(
        served_blob_spec(server.url, index.layer_digest, len(blob)), encode_index(index)
    )
    layers = LazyLayers(
        LazyLayerSettings(config.cache_dir, 64 << 20, fetch_timeout=5, background=NO_BACKGROUND),
        resolve=lambda labels: spec,
    )
    core = Snapshotter(str(root), remote=layers)
    yield LazyRoot(root, config, core, layers, server, index, blob)
    for state in root.glob("snapshots/*/fs.lazysnap.json"):
        layers.unmount(str(state).removesuffix(".lazysnap.json"))
    core.close()
    server.stop()


def mount_lazily(lazy: LazyRoot) -> LayerStatus:
    with pytest.raises(AlreadyExists):
        lazy.core.prepare(
            "status-tests/2/extract-1",
            "",
            {
                "containerd.io/snapshot.ref": TARGET,
                "containerd.io/snapshot/cri.layer-digest": lazy.index.layer_digest,
                "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/test/app:1",
            },
        )
    [layer] = collect_status(lazy.config).layers
    return layer


def wait_for(lazy: LazyRoot, done: str, condition: object) -> LayerStatus:
    """The layer's status once condition(layer) holds (mount processes refresh every 2 s)."""
    deadline = time.monotonic() + 15
    while True:
        [layer] = collect_status(lazy.config).layers
        if condition(layer):  # type: ignore[operator]
            return layer
        assert time.monotonic() < deadline, f"never {done}: {layer}"
        time.sleep(0.2)


def status_cli(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "status", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_what_reading_a_file_fetched_and_cached(lazy_root: LazyRoot) -> None:
    lazy = lazy_root
    fresh = mount_lazily(lazy)
    assert fresh.state == LIVE and fresh.snapshot_name == TARGET
    assert fresh.layer_digest == lazy.index.layer_digest
    assert fresh.layer_size == len(lazy.blob)
    assert fresh.spans_total == len(lazy.index.spans)
    assert (fresh.bytes_fetched, fresh.spans_cached) == (0, 0)
    state = json.loads(Path(fresh.mountpoint + ".lazysnap.json").read_text())
    assert fresh.pid == state["pid"]

    entry = [e for e in lazy.index.entries if e.name == READ_FILE][-1]
    assert len((Path(fresh.mountpoint) / READ_FILE).read_bytes()) == entry.size
    read = wait_for(lazy, "counted the fetch", lambda layer: layer.bytes_fetched > 0)

    # Exactly what the server sent, and exactly the spans holding the file.
    sent = sum(last - first + 1 for first, last in lazy.server.requests)
    wanted = set(spans_for_range(lazy.index, entry.offset, entry.offset + entry.size))
    assert read.bytes_fetched == sent
    assert read.spans_cached == len(wanted) < len(lazy.index.spans)
    assert read.read_errors == 0
    assert read.fetched_percent == pytest.approx(100 * sent / len(lazy.blob))

    shown = status_cli(lazy.root, "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    [layer_json] = report["layers"]
    assert layer_json["bytes_fetched"] == sent
    assert layer_json["spans_cached"] == len(wanted)
    assert layer_json["spans_total"] == len(lazy.index.spans)
    assert layer_json["state"] == LIVE and layer_json["snapshot_name"] == TARGET
    assert layer_json["fetched_percent"] == round(100 * sent / len(lazy.blob), 2)
    assert report["cache"]["spans"] == len(wanted)
    # each cached span file carries a small digest header (what the cache bound counts)
    assert report["cache"]["bytes"] == sum(
        HEADER_SIZE + lazy.index.spans[s].uncompressed_size for s in wanted
    )
    assert report["daemon"]["running"] is False  # only the core runs here, no serve

    table = status_cli(lazy.root)
    assert table.returncode == 0, table.stderr
    digest_short = lazy.index.layer_digest[:19]  # "sha256:" + 12 hex
    [row] = [line for line in table.stdout.splitlines() if LIVE in line.split()]
    assert row.startswith(digest_short + " ")
    assert LIVE in row.split()
    assert f"({round(100 * sent / len(lazy.blob))}%)" in row
    assert f"{len(wanted)}/{len(lazy.index.spans)}" in row.split()


def test_status_shows_a_copy_given_up_on_then_the_layer_gone_local(lazy_root: LazyRoot) -> None:
    """The records the daemon's materializer leaves beside the mountpoint (sidecars.py), written
    here through the same functions, as the table and the JSON show them."""
    lazy = lazy_root
    before = time.time()
    layer = mount_lazily(lazy)
    assert layer.pid is not None
    assert layer.updated_at is not None and before <= layer.updated_at <= time.time()
    assert (layer.local_since, layer.materialize_failed) == (None, "")

    write_failure(layer.mountpoint, "no space left for the copy", 3, time.time())
    report = json.loads(status_cli(lazy.root, "--json").stdout)
    [shown] = report["layers"]
    assert shown["state"] == LIVE and shown["materialize_failed"] == "no space left for the copy"
    assert report["all_local"] is False and report["layers_local"] == 0
    table = status_cli(lazy.root).stdout
    assert "(materialize failed: no space left for the copy)" in table, table

    gone_local_at = time.time()
    write_marker(layer.mountpoint, LocalMarker(layer.layer_digest, gone_local_at))
    try:
        report = json.loads(status_cli(lazy.root, "--json").stdout)
        [shown] = report["layers"]
        assert shown["state"] == "local" and shown["local_since"] == gone_local_at
        assert shown["materialize_failed"] == ""  # the copy that counts succeeded
        assert shown["pid"] == layer.pid  # still serving the containers started before
        assert report["all_local"] is True and report["layers_local"] == 1
        table = status_cli(lazy.root).stdout
        assert "layers  1 of 1 local (plain files), rest on FUSE" in table, table
        assert f"its process {layer.pid} still serves containers started before" in table, table
    finally:
        remove_marker(layer.mountpoint)  # the FUSE mount is still there: unmount it as lazy
        remove_failure(layer.mountpoint)


def test_metrics_collector_reports_the_same_figures_per_layer(lazy_root: LazyRoot) -> None:
    lazy = lazy_root
    layer = mount_lazily(lazy)
    (Path(layer.mountpoint) / READ_FILE).read_bytes()
    read = wait_for(lazy, "counted the fetch", lambda layer: layer.bytes_fetched > 0)

    collector = LazyLayerCollector(str(lazy.root), lazy.config.cache_dir, 64 << 20)
    samples = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    digest = (lazy.index.layer_digest,)
    assert samples[("lazysnap_layer_fetched_bytes_total", digest)] == read.bytes_fetched
    assert samples[("lazysnap_layer_fetched_spans_total", digest)] == read.spans_cached
    assert samples[("lazysnap_layer_read_errors_total", digest)] == 0
    state = read_state(layer.mountpoint)
    assert state is not None
    assert (
        samples[("lazysnap_layer_readahead_spans_total", digest)]
        == state["counters"]["readahead_spans"]
    )
    assert samples[("lazysnap_lazy_layers_mounted", ())] == 1
    assert samples[("lazysnap_cache_spans", ())] == read.spans_cached


def _deaths_metrics(lazy: LazyRoot) -> tuple[float, float]:
    """(mount process deaths, mounts on dead connections) as the metrics endpoint has them."""
    collector = LazyLayerCollector(str(lazy.root), lazy.config.cache_dir, 64 << 20)
    values = {f.name: f.samples[0].value for f in collector.collect() if f.samples}
    return values["lazysnap_mount_process_deaths"], values["lazysnap_mounts_on_dead_connections"]


def test_status_tells_a_dead_mount_from_an_unmounted_one_and_sees_it_come_back(
    lazy_root: LazyRoot,
) -> None:
    lazy = lazy_root
    layer = mount_lazily(lazy)
    assert layer.pid is not None
    # A container's rootfs: an overlay with the layer as its lowerdir.
    rootfs, work = lazy.root.parent / "rootfs", lazy.root.parent / "overlay"
    for directory in (rootfs, work / "upper", work / "work"):
        directory.mkdir(parents=True)
    overlay = f"lowerdir={layer.mountpoint},upperdir={work}/upper,workdir={work}/work"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", overlay, str(rootfs)], check=True)
    try:
        # While the daemon runs it notices the death and starts a new process (deaths.py);
        # the overlay keeps the dead connection, and status names it until it is gone.
        os.kill(layer.pid, signal.SIGKILL)
        revived = wait_for(
            lazy, "restarted the dead process", lambda now: now.state == LIVE and now.deaths == 1
        )
        assert revived.pid not in (None, layer.pid) and revived.stranded == (str(rootfs),)
        with pytest.raises(OSError) as failed:
            (rootfs / READ_FILE).read_bytes()
        assert failed.value.errno == errno.ENOTCONN
        assert (Path(revived.mountpoint) / READ_FILE).read_bytes()  # new containers are fine
        table = status_cli(lazy.root).stdout
        assert "died 1 time(s)" in table and f"restart them: {rootfs}" in table, table
        assert _deaths_metrics(lazy) == (1, 1)
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)
    assert collect_status(lazy.config).layers[0].stranded == ()
    assert _deaths_metrics(lazy) == (1, 0)
    layer = revived
    assert layer.pid is not None

    lazy.layers.close()  # the daemon stops following its mount processes: as if it were down
    os.kill(layer.pid, signal.SIGKILL)  # a crashed mount process leaves its FUSE mount behind
    # (for an instant while the process dies the kernel answers ECONNABORTED, not ENOTCONN)
    dead = wait_for(lazy, "noticed the dead process", lambda layer: layer.state == DEAD)
    assert "ENOTCONN" in dead.problem

    shown = status_cli(lazy.root)
    assert shown.returncode == 0 and "ENOTCONN" in shown.stdout and DEAD in shown.stdout

    subprocess.run(["umount", "-l", layer.mountpoint], check=True)  # what a reboot leaves
    [gone] = collect_status(lazy.config).layers
    assert gone.state == UNMOUNTED and gone.snapshot_name == TARGET

    lazy.core.restore_remote_snapshots()  # what serve does when it starts
    [back] = collect_status(lazy.config).layers
    assert back.state == LIVE and back.pid not in (None, layer.pid)

    lazy.core.remove(TARGET)
    assert collect_status(lazy.config).layers == []
