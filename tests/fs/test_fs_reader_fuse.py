"""The kernel's side of a hung registry: a read(2) through the FUSE mount, which the kernel sends
as readahead plus a retry of the page readahead failed to fill, gets EIO within one fetch
timeout, and the same read works once the registry answers again."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.url_blob import served_blob_spec
from snapshotter.fs.span_states import RETRY_AFTER_FAILURE_S
from snapshotter.index.codec import encode_index
from snapshotter.index.spans import fetch_range
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members

pytestmark = pytest.mark.stack
FETCH_TIMEOUT = 3.0
SLACK = 1.0  # FUSE round trips and scheduling on a loaded 2-core machine


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[LazyLayers]:
    instance = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT, ready_timeout=30
        )
    )
    yield instance
    for state in tmp_path.rglob("*.lazysnap.json"):
        instance.unmount(str(state).removesuffix(".lazysnap.json"))
    for mountpoint in instance.supervisor.mountpoints():
        instance.unmount(mountpoint)


def test_a_read_through_fuse_from_a_hung_registry_costs_one_fetch_timeout(
    manager: LazyLayers, tmp_path: Path
) -> None:
    tar = make_tar(rich_members())
    blob = compress(tar, "gzip")
    index = built_index(blob, "gzip")
    entry = [e for e in index.entries if e.name == "usr/lib/big.bin"][-1]
    server = BlobServer(blob)
    hang = threading.Event()
    try:
        mountpoint = tmp_path / "fs"
        mountpoint.mkdir()
        spec = LayerSpec(
            blob=served_blob_spec(server.url, index.layer_digest, len(blob)),
            index_bytes=encode_index(index),
        )
        manager.mount_layer(str(mountpoint), spec)
        server.gates = {fetch_range(index, n)[0]: hang for n in range(len(index.spans))}

        started = time.monotonic()
        with pytest.raises(OSError) as failure:
            (mountpoint / "usr/lib/big.bin").read_bytes()
        took = time.monotonic() - started
        assert failure.value.errno == errno.EIO
        assert took <= FETCH_TIMEOUT + SLACK, f"EIO after {took:.1f} s"

        server.gates.clear()  # the registry answers again
        hang.set()
        time.sleep(RETRY_AFTER_FAILURE_S)
        got = (mountpoint / "usr/lib/big.bin").read_bytes()
        assert got == tar[entry.offset : entry.offset + entry.size]
    finally:
        hang.set()
        server.stop()
