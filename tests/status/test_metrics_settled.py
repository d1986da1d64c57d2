"""The metrics learn how a lazy mount ends from the manager's on_settled() observer: nothing
waits in check() on their behalf, so the layer stays the core's to check, clean and remove."""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.core.errors import AlreadyExists
from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.metrics import DaemonMetrics
from tests.fs.fs_helpers import Member, built_index, compress, make_tar
from tests.status.test_status_metrics import labels, prepares, scrape, settled_scrape, starting

pytestmark = pytest.mark.stack

SLOW_START_S = 20.0  # far beyond what a Remove may take


def layer_spec(workdir: Path, *, index_bytes: bytes | None = None) -> LayerSpec:
    blob = compress(make_tar([Member("etc/motd", data=b"hello\n")]), "gzip")
    (workdir / "layer.tar.gz").write_bytes(blob)
    index = built_index(blob, "gzip")
    return LayerSpec(
        blob=BlobSpec("file", str(workdir / "layer.tar.gz"), index.layer_digest),
        index_bytes=index_bytes if index_bytes is not None else encode_index(index),
    )


def slow_python(workdir: Path) -> str:
    """An interpreter that sleeps before it becomes the mount process: a mount that is still
    starting for as long as a test needs. Its command line names the mount process module, as
    the real one's does, so unmount() recognises and stops it."""
    script = workdir / "slow-python"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -c 'import os, sys, time; time.sleep({SLOW_START_S}); "
        'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\' "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def metered(workdir: Path) -> Iterator[tuple[DaemonMetrics, Path]]:
    root = workdir / "root"
    metrics = DaemonMetrics(str(root), str(root / "cache"), 1 << 30)
    metrics.serve("127.0.0.1:0")
    yield metrics, root
    metrics.stop()


def only_upper(core: Snapshotter) -> str:
    uppers = [str(p) for p in Path(core.snapshots_dir).glob("*/fs")]
    assert len(uppers) == 1, uppers
    return uppers[0]


def test_removing_a_layer_still_starting_is_not_held_up_by_the_metrics(
    workdir: Path, metered: tuple[DaemonMetrics, Path]
) -> None:
    metrics, root = metered
    layers = LazyLayers(
        LazyLayerSettings(
            str(workdir / "cache"),
            1 << 20,
            mount_in_background=True,
            python=slow_python(workdir),
            ready_timeout=SLOW_START_S + 10,
        ),
        resolve=lambda _labels: layer_spec(workdir),
    )
    core = metrics.snapshotter(str(root), layers)
    try:
        with pytest.raises(AlreadyExists):
            core.prepare("extract-1", "", labels("chain-1"))
        assert starting(scrape(metrics.port)) == 1
        began = time.monotonic()
        core.remove("chain-1")
        assert time.monotonic() - began < 5
        # The removed mount never became live: it leaves the starting gauge at once.
        samples = settled_scrape(metrics.port, timeout=5)
        assert starting(samples) == 0
        assert prepares(samples, "lazy") == 0
        assert prepares(samples, "lazy_failed", "mount") == 1
    finally:
        core.close()


def test_a_failed_start_is_counted_and_its_cause_is_left_for_the_core(
    workdir: Path, metered: tuple[DaemonMetrics, Path]
) -> None:
    """The observer only counts: the core's own check() still gets the mount process's reason
    (a check() made by the metrics would have reported it, cleaned the mount away, and left the
    core a bare "not mounted")."""
    metrics, root = metered
    bad = layer_spec(workdir, index_bytes=b"not an index")
    layers = LazyLayers(
        LazyLayerSettings(str(workdir / "cache"), 1 << 20, mount_in_background=True),
        resolve=lambda _labels: bad,
    )
    core = metrics.snapshotter(str(root), layers)
    try:
        with pytest.raises(AlreadyExists):
            core.prepare("extract-1", "", labels("chain-1"))
        samples = settled_scrape(metrics.port, timeout=60)
        assert prepares(samples, "lazy_failed", "mount") == 1
        upper = only_upper(core)
        with pytest.raises(RemoteLayerUnavailable, match=r"index file .*fs\.lazysnap-index"):
            layers.check(upper, {})
        assert not Path(upper + ".lazysnap-index").exists()  # check() cleaned it away
    finally:
        core.close()


def test_a_live_mount_counts_as_lazy_and_a_settled_one_is_answered_at_once(
    workdir: Path, metered: tuple[DaemonMetrics, Path]
) -> None:
    metrics, root = metered
    layers = LazyLayers(
        LazyLayerSettings(str(workdir / "cache"), 1 << 20, mount_in_background=True),
        resolve=lambda _labels: layer_spec(workdir),
    )
    core = metrics.snapshotter(str(root), layers)
    try:
        with pytest.raises(AlreadyExists):
            core.prepare("extract-1", "", labels("chain-1"))
        samples = settled_scrape(metrics.port, timeout=60)
        assert prepares(samples, "lazy") == 1 and starting(samples) == 0
        upper = only_upper(core)
        assert (Path(upper) / "etc/motd").read_bytes() == b"hello\n"
        outcomes: list[RemoteLayerUnavailable | None] = []
        layers.on_settled(upper, outcomes.append)  # settled long ago: answered on this thread
        assert outcomes == [None]
        core.remove("chain-1")
        layers.on_settled(upper, outcomes.append)
        assert len(outcomes) == 2 and "not mounted" in str(outcomes[1])
    finally:
        core.close()
