"""The big image (Debian + python3 + numpy/pandas..., 3 gzip layers, ~21k paths) through the
real stack: indexed, pulled lazily, run; its root filesystem equal to containerd's own unpack;
and read whole through a span cache smaller than the image."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.images import BuiltImage, PushedImage
from tests.conftest import SESSION_CACHE_MAX_BYTES
from tests.lazy.edge_layer import edge_layer_tar, stack_layer
from tests.lazy.lazy_helpers import LazyStack, unique_name

pytestmark = [pytest.mark.stack, pytest.mark.slow]

WALKER = (Path(__file__).parent / "rootfs_walker.py").read_text()
# of the image's layer bytes: a lazy pull fetches the indexes only, ~3 % of the layers with 1 MiB
# spans (one 32 KiB zran window per span; ~1 % with 4 MiB spans)
MAX_PULL_TRANSFER = 0.04


def lazily_pulled(stack: LazyStack, built: BuiltImage, prefix: str) -> PushedImage:
    """built under a repository of this test's own, indexed, pulled with every layer lazy."""
    image = stack.push(built, unique_name(f"test/{prefix}"))
    stack.index_build(image.reference)
    pulled = stack.pull(image.reference)
    assert (pulled.lazy, pulled.pulled) == (len(built.layers), 0), pulled.stdout
    return image


def test_pybig_pulls_lazily_with_a_tiny_transfer_and_runs_python(
    stack: LazyStack, pybig_image: PushedImage
) -> None:
    image = stack.push(pybig_image.built, unique_name("test/lazy-run"))
    layer_bytes = pybig_image.built.blob_bytes
    assert len(image.layers) == 3 and layer_bytes >= 150_000_000
    # No static start-up profile: its prefetch at mount reads python's files from the layer
    # blobs (tests/indexer/test_static_profile_stack.py), and this test checks the pull itself.
    built = stack.index_build(image.reference, "--no-static-profile")
    assert "3 layers indexed" in built or "3 layers" in built, built

    before = stack.registry.log_offset()
    pulled = stack.pull(image.reference)
    fetched = stack.registry.blob_fetches(since=before)

    assert (pulled.lazy, pulled.pulled) == (3, 0), pulled.stdout
    layer_digests = {layer.digest for layer in image.layers}
    assert not layer_digests & set(fetched), f"layer blobs fetched by a lazy pull: {fetched}"
    # Everything the pull made the registry send: config, index blobs (and nothing else).
    transferred = sum(f.bytes for f in fetched.values())
    print(
        f"\nlazy pull of pybig transferred {transferred} blob bytes of {layer_bytes} "
        f"({100 * transferred / layer_bytes:.2f} %): {len(fetched)} blobs"
    )
    assert transferred < MAX_PULL_TRANSFER * layer_bytes, fetched

    output = stack.run_ok(
        image.reference, "python3", "-c", "import numpy, pandas; print(numpy.arange(3).sum())"
    )
    assert output == "3\n"


def _walk(stack: LazyStack, reference: str, snapshotter: str) -> dict[str, dict[str, object]]:
    stdout = stack.run_ok(reference, "python3", "-c", WALKER, snapshotter=snapshotter)
    records = [json.loads(line) for line in stdout.splitlines()]
    return {str(record["path"]): record for record in records}


def _differences(
    expected: dict[str, dict[str, object]], actual: dict[str, dict[str, object]]
) -> list[str]:
    problems = [f"missing through lazysnap: {path}" for path in sorted(expected.keys() - actual)]
    problems += [f"only through lazysnap: {path}" for path in sorted(actual.keys() - expected)]
    for path in sorted(expected.keys() & actual.keys()):
        want, got = expected[path], actual[path]
        for key in sorted(want.keys() | got.keys()):
            if want.get(key) != got.get(key):
                problems.append(
                    f"{path}: {key} overlayfs={want.get(key)!r} lazysnap={got.get(key)!r}"
                )
    return problems


def _assert_edge_layer_applied(tree: dict[str, dict[str, object]]) -> None:
    """The edge layer's features reached containerd's own unpack (so comparing with it tests
    them): opaque dir, whiteouts, a file over a dir, xattrs, modes, owners, hardlink, device."""
    assert [p for p in tree if p.startswith("/usr/share/doc/")] == ["/usr/share/doc/README"]
    assert "/etc/issue.net" not in tree and "/usr/share/man" not in tree
    assert tree["/usr/share/lintian"]["type"] == stat.S_IFREG
    xattrs = {"user.a": b"1".hex(), "user.lazysnap": b"edge".hex()}
    assert tree["/opt/edge/xattrs"]["xattrs"] == xattrs
    assert tree["/opt/edge"]["xattrs"] == {"user.kind": b"dir".hex()}
    assert tree["/opt/edge/setuid"]["mode"] == 0o4755
    assert tree["/opt/edge/sticky"]["mode"] == 0o1777
    assert (tree["/opt/edge/owned"]["uid"], tree["/opt/edge/owned"]["gid"]) == (1234, 5678)
    assert tree["/opt/edge/link-b"]["link_group"] == "/opt/edge/link-a"
    assert tree["/opt/edge/null"]["type"] == stat.S_IFCHR
    assert tree["/opt/edge/null"]["rdev"] == [1, 3]
    assert tree["/opt/edge/fifo"]["type"] == stat.S_IFIFO
    assert tree["/opt/edge/absolute"]["target"] == "/etc/motd"
    for link in ("/opt/edge/link-0644", "/opt/edge/link-0600"):  # header 0644 / 0600
        assert (tree[link]["type"], tree[link]["mode"]) == (stat.S_IFLNK, 0o777), link
    assert tree["/opt/edge/link-0600"]["uid"] == 1234


def test_pybig_rootfs_through_lazysnap_equals_containerds_own_unpack(
    stack: LazyStack, pybig_image: PushedImage
) -> None:
    """Every path of the container's root filesystem, with type, mode, owner, size, link target,
    xattrs, hardlinks, device numbers, file mtimes and content sha256: lazily mounted layers
    under lazysnap vs the same image pulled by containerd into its overlayfs snapshotter.

    The image is pybig plus an edge layer (tests/lazy/edge_layer.py) of what pybig lacks:
    opaque dir, whiteouts, a file replacing a directory, xattrs, devices, a fifo, odd modes."""
    built = stack_layer(pybig_image.built, stack.workdir / "edge", edge_layer_tar())
    image = lazily_pulled(stack, built, "lazy-tree")
    stack.ctr_pull(image.reference, snapshotter="overlayfs")

    expected = _walk(stack, image.reference, "overlayfs")
    actual = _walk(stack, image.reference, "lazysnap")

    assert len(expected) >= 15_000, f"walker saw only {len(expected)} paths"
    _assert_edge_layer_applied(expected)
    unreadable = [p for p, r in actual.items() if str(r.get("sha256", "")).startswith("error")]
    assert not unreadable, f"{len(unreadable)} files unreadable through lazysnap: {unreadable[:20]}"
    problems = _differences(expected, actual)
    assert not problems, f"{len(problems)} differences, first 40:\n" + "\n".join(problems[:40])


# Directories and the lock and ledger files: what du counts beyond the span files (headers
# included) that the cache keeps under max_size_bytes.
CACHE_METADATA_SLACK = 64 << 10


@dataclass(frozen=True)
class CacheSample:
    total: int  # du of the whole cache dir
    in_flight: int  # du of tmp/: spans being written, not yet in the ledger


def _du(path: Path) -> int:
    result = subprocess.run(
        # apparent sizes: the bytes the cache bounds (not the filesystem's block rounding)
        ["du", "-s", "--apparent-size", "--block-size=1", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[0])


def _cache_sample(cache_dir: Path) -> CacheSample:
    """du of the cache while holding its lock: the lock is what every change to spans/ and the
    ledger takes (fs/cache.py), so no eviction or rename runs while du walks, and the figure is
    consistent rather than a span counted both before and after it moved."""
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total, in_flight = _du(cache_dir), _du(cache_dir / "tmp")
    finally:
        os.close(fd)
    return CacheSample(total=total, in_flight=in_flight)


READ_EVERYTHING = """
import os, sys
files = size = 0
for top, dirs, names in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys", "/dev", "/run")]
    for name in names:
        path = os.path.join(top, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    size += len(chunk)
            files += 1
print(files, size)
"""


def test_reading_all_of_pybig_keeps_the_span_cache_under_its_limit(
    stack: LazyStack, pybig_image: PushedImage
) -> None:
    """The session daemon's cache limit (SESSION_CACHE_MAX_BYTES) is below pybig's size, both
    compressed and inflated: reading every file must work, evicting as it goes, and the cache
    directory must never grow past the limit (du sampled throughout the read)."""
    limit = SESSION_CACHE_MAX_BYTES
    assert limit < pybig_image.built.blob_bytes
    image = lazily_pulled(stack, pybig_image.built, "lazy-cache")
    cache_dir = stack.daemon.cache_dir

    samples: list[CacheSample] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(_cache_sample(cache_dir))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output = stack.run_ok(image.reference, "python3", "-c", READ_EVERYTHING)
    finally:
        done.set()
        sampler.join()

    files, size = (int(word) for word in output.split())
    assert files >= 15_000 and size > limit, output
    assert samples, f"no du sample of {cache_dir}"
    peak = max(samples, key=lambda s: s.total)
    print(f"\nread {files} files, {size} bytes; cache du peak {peak} of limit {limit}")
    allowed = limit + CACHE_METADATA_SLACK
    settled = [s.total - s.in_flight for s in samples]
    assert max(settled) <= allowed, (
        f"cache {cache_dir} holds {max(settled)} bytes of spans > limit {limit} (+slack)"
    )
    settled_now = _cache_sample(cache_dir)
    assert settled_now.total <= allowed, f"after the read: {settled_now}"
    # Spans being written count too: the cache reserves their room in tmp/ before writing.
    assert peak.total <= allowed, (
        f"cache dir peaked at {peak.total} > {allowed} bytes, {peak.in_flight} of them in tmp/"
    )
