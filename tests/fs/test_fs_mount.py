"""The lazy layer mounted over FUSE by its own process, as containerd's overlay will use it."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.registry import Registry
from harness.url_blob import served_blob_spec
from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.mount_spec import READ_AHEAD_KB, START_READ_AHEAD_KB
from snapshotter.index.codec import encode_index
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import spans_for_range
from snapshotter.lazylayers.deaths import DeathRecord, read_record
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.lazylayers.supervisor import RESTART_MIN_INTERVAL_S
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Repository
from snapshotter.sidecars import read_state
from snapshotter.status.collect import lazy_mounts
from tests.fs.fs_helpers import (
    SPAN_SIZE,
    BlobServer,
    Member,
    assert_tree_matches,
    built_index,
    compress,
    expected_view,
    make_tar,
    rich_members,
)
from tests.fs.lazy_layers_helpers import is_live
from tests.fs.manual_clock import ManualClock

pytestmark = pytest.mark.stack
FETCH_TIMEOUT = 3.0
REPO_ROOT = Path(__file__).resolve().parents[2]


class Layer:
    def __init__(self, tar: bytes, blob: bytes, index: LayerIndex) -> None:
        self.tar, self.blob, self.index = tar, blob, index
        self.server = BlobServer(blob)

    def spec(self) -> LayerSpec:
        return LayerSpec(
            blob=served_blob_spec(self.server.url, self.index.layer_digest, len(self.blob)),
            index_bytes=encode_index(self.index),
            diff_id="sha256:" + hashlib.sha256(self.tar).hexdigest(),  # the image config's
        )

    def data(self, name: str) -> bytes:
        entry = [e for e in self.index.entries if e.name == name][-1]
        return self.tar[entry.offset : entry.offset + entry.size]


@pytest.fixture(params=["tar", "gzip", "zstd"])
def layer(request: pytest.FixtureRequest) -> Iterator[Layer]:
    tar = make_tar(rich_members())
    blob = compress(tar, request.param)
    instance = Layer(tar, blob, built_index(blob, request.param))
    yield instance
    instance.server.stop()


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


def _mount(manager: LazyLayers, layer: Layer, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    manager.mount_layer(str(where), layer.spec())
    return where


def test_mounted_layer_matches_the_extracted_tar(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    assert_tree_matches(mnt, expected_view(layer.tar, tmp_path), served=True)
    tool, link = os.stat(mnt / "usr/bin/tool"), os.stat(mnt / "usr/bin/tool-link")
    assert tool.st_ino == link.st_ino


_GETDENTS64 = {"x86_64": 217, "aarch64": 61}  # syscall numbers
_DT_BY_KIND = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _raw_listing(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (d_ino, d_type) as getdents64 gives them, '.' and '..' included (os.scandir
    drops those two)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    entries: dict[str, tuple[int, int]] = {}
    try:
        buffer = ctypes.create_string_buffer(1 << 16)
        while (got := libc.syscall(_GETDENTS64[os.uname().machine], fd, buffer, len(buffer))) > 0:
            at = 0
            while at < got:
                ino, _, length, kind = struct.unpack_from("<QqHB", buffer.raw, at)
                name = buffer.raw[at + 19 : at + length].split(b"\0", 1)[0]
                entries[os.fsdecode(name)] = (ino, kind)
                at += length
        assert got == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    return entries


def test_listings_give_every_name_with_its_type_and_inode(
    manager: LazyLayers, tmp_path: Path
) -> None:
    kinds = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE]
    big = {f"entry-{i:04d}-{'x' * (i % 40)}": kinds[i % 4] for i in range(1500)}
    members = [Member("big", tarfile.DIRTYPE, mode=0o755), Member("empty", tarfile.DIRTYPE)]
    members += [
        Member(f"big/{name}", kind, linkname="elsewhere" if kind == tarfile.SYMTYPE else "")
        for name, kind in big.items()
    ]
    tar = make_tar(members)
    blob = compress(tar, "gzip")
    layer = Layer(tar, blob, built_index(blob, "gzip"))
    try:
        mnt = _mount(manager, layer, tmp_path / "fs")
        for directory, expected in [(mnt / "big", big), (mnt / "empty", {})]:
            with os.scandir(directory) as listing:
                seen = {entry.name: entry for entry in listing}
            assert sorted(seen) == sorted(expected)
            raw = _raw_listing(directory)
            assert sorted(raw) == sorted([".", "..", *expected])
            for name, entry in seen.items():
                file_type = stat.S_IFMT(os.lstat(entry.path).st_mode)
                assert file_type == _DT_BY_KIND[expected[name]]
                assert entry.is_dir(follow_symlinks=False) == (file_type == stat.S_IFDIR)
                assert entry.is_symlink() == (file_type == stat.S_IFLNK)
                assert entry.inode() == raw[name][0] == os.lstat(entry.path).st_ino
                assert raw[name][1] << 12 == file_type  # d_type is the S_IFMT bits >> 12
            assert raw["."] == (os.stat(directory).st_ino, stat.S_IFDIR >> 12)
            assert raw[".."][1] == stat.S_IFDIR >> 12
    finally:
        layer.server.stop()


def test_the_mount_is_read_only_and_tuned_for_big_reads(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    with pytest.raises(OSError) as failure:
        open(mnt / "etc/hosts", "w").close()
    assert failure.value.errno == errno.EROFS
    with pytest.raises(OSError):
        (mnt / "new").write_text("x")
    # a small read-ahead while the layer's start goes on, 1 MiB FUSE reads once its
    # background fetch starts (the layer quiet for background_quiet_seconds)
    assert _read_ahead_kb(mnt) == START_READ_AHEAD_KB
    deadline = time.monotonic() + BackgroundSettings().quiet_seconds + 10
    while time.monotonic() < deadline and _read_ahead_kb(mnt) != READ_AHEAD_KB:
        time.sleep(0.1)
    assert _read_ahead_kb(mnt) == READ_AHEAD_KB


def _read_ahead_kb(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())


BIG_FILE_MB = 16
# What a shared object's loader does: map the file, touch one page.
MAP_AND_TOUCH = """
import mmap, sys
with open(sys.argv[1], "rb") as file:
    with mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        at = int(sys.argv[2])
        sys.stdout.buffer.write(mapped[at : at + 4096])
"""


def _bytes_requested_once_settled(server: BlobServer) -> int:
    """The bytes asked of server once no request came for a while: the kernel's read-around
    sends its other reads beside the faulting one, and they may still be on their way."""
    deadline = time.monotonic() + 10
    seen = -1
    while time.monotonic() < deadline and server.request_count() != seen:
        seen = server.request_count()
        time.sleep(0.5)
    return sum(last - first + 1 for first, last in list(server.requests))


@pytest.mark.parametrize("start_read_ahead_kb", [START_READ_AHEAD_KB, READ_AHEAD_KB])
def test_a_page_fault_during_the_start_fetches_the_spans_around_it_not_the_file(
    start_read_ahead_kb: int, tmp_path: Path
) -> None:
    # What a shared object's loader does: map the file, touch a page in the middle. At a 4 MiB
    # read-ahead the kernel reads 4 MiB around the fault; during the start, 128 KiB.
    data = os.urandom(BIG_FILE_MB << 20)
    tar = make_tar([Member("lib", tarfile.DIRTYPE, mode=0o755), Member("lib/big.so", data=data)])
    layer = Layer(tar, tar, built_index(tar, "tar"))
    manager = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=FETCH_TIMEOUT,
            start_read_ahead_kb=start_read_ahead_kb,
            background=BackgroundSettings(enabled=False),
        )
    )
    try:
        mnt = _mount(manager, layer, tmp_path / "fs")
        assert _read_ahead_kb(mnt) == start_read_ahead_kb
        middle = (BIG_FILE_MB << 20) // 2
        # In a process of its own: the blob server answers from this one, and a page fault
        # here would hold the GIL it needs.
        touched = subprocess.run(
            [sys.executable, "-c", MAP_AND_TOUCH, str(mnt / "lib/big.so"), str(middle)],
            check=True,
            capture_output=True,
        ).stdout
        assert touched == data[middle : middle + 4096]
        fetched = _bytes_requested_once_settled(layer.server)
        if start_read_ahead_kb == START_READ_AHEAD_KB:
            assert fetched <= 4 * SPAN_SIZE + (START_READ_AHEAD_KB << 10)
        else:  # today's read-ahead after the start, and before this change during it too
            assert fetched >= 2 << 20
    finally:
        manager.unmount(str(tmp_path / "fs"))
        layer.server.stop()


def test_read_around_takes_a_faulting_files_next_spans_in_one_request_and_no_other_files(
    tmp_path: Path,
) -> None:
    # A shared object's loader faults a page in the middle of a large file during the start:
    # with read-around (scope file) the spans after the fault come along in the same request,
    # up to the budget, and never spans holding only the next file's bytes.
    rng = random.Random(15)
    big, other = rng.randbytes(40 * SPAN_SIZE), rng.randbytes(8 * SPAN_SIZE)
    tar = make_tar(
        [
            Member("lib", tarfile.DIRTYPE, mode=0o755),
            Member("lib/big.so", data=big),
            Member("lib/other.so", data=other),
        ]
    )
    blob = compress(tar, "gzip")
    layer = Layer(tar, blob, built_index(blob, "gzip", file_cut_min=SPAN_SIZE // 4))
    entry = next(e for e in layer.index.entries if e.name == "lib/big.so")
    big_spans = spans_for_range(layer.index, entry.offset, entry.offset + entry.size)
    budget = 12 * SPAN_SIZE  # compressed: the data is random, a span is ~SPAN_SIZE of it
    manager = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=FETCH_TIMEOUT,
            read_ahead_spans=0,  # only read-around fetches what no read asked for
            read_around_bytes=budget,
            read_around_scope="file",
            background=BackgroundSettings(enabled=False),
        )
    )

    def requested() -> list[set[int]]:
        _bytes_requested_once_settled(layer.server)
        return [
            {
                n
                for n, span in enumerate(layer.index.spans)
                if first <= span.compressed_start and span.compressed_end <= last + 1
            }
            for first, last in sorted(layer.server.requests)
        ]

    try:
        mnt = _mount(manager, layer, tmp_path / "fs")
        for at in (len(big) // 2, len(big) - 3 * SPAN_SIZE):  # the middle, then near the end
            touched = subprocess.run(
                [sys.executable, "-c", MAP_AND_TOUCH, str(mnt / "lib/big.so"), str(at)],
                check=True,
                capture_output=True,
            ).stdout
            assert touched == big[at : at + 4096]
        middle, end = requested()
        fault = entry.offset + len(big) // 2
        [fault_span] = spans_for_range(layer.index, fault, fault + 1)
        assert fault_span in middle and max(middle) >= fault_span + 8  # and ~10 after it
        assert sum(layer.index.spans[n].compressed_size for n in middle) <= budget + 3 * SPAN_SIZE
        assert max(end) == big_spans[-1]  # the file's last span, not the next file's
        # Every byte still equals the tar's, read in any order.
        reads = [(name, data) for name, data in (("lib/big.so", big), ("lib/other.so", other))]
        for _ in range(200):
            name, data = rng.choice(reads)
            offset, length = rng.randrange(len(data)), rng.randint(1, 3 * SPAN_SIZE)
            with open(mnt / name, "rb") as file:
                file.seek(offset)
                assert file.read(length) == data[offset : offset + length]
    finally:
        manager.unmount(str(tmp_path / "fs"))
        layer.server.stop()


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_random_reads_from_many_threads_match_the_tar_with_file_aware_spans(
    kind: str, tmp_path: Path
) -> None:
    # Small spans cut at file starts, a small start read-ahead, reads of neighbouring spans
    # arriving together (and fetched together): every byte still equals the tar's.
    rng = random.Random(15)
    members = [Member("pkg", tarfile.DIRTYPE, mode=0o755)]
    members += [
        Member(f"pkg/m{i:02}.py", data=rng.randbytes(rng.randint(1, 40 << 10))) for i in range(40)
    ]
    members += [Member(f"pkg/big{i}.so", data=rng.randbytes(12 * SPAN_SIZE)) for i in range(2)]
    tar = make_tar(members)
    blob = compress(tar, kind)
    layer = Layer(tar, blob, built_index(blob, kind, file_cut_min=SPAN_SIZE // 4))
    assert len(layer.index.spans) > len(built_index(blob, kind).spans)  # cut at files too
    manager = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=FETCH_TIMEOUT,
            background=BackgroundSettings(enabled=False),
        )
    )
    try:
        mnt = _mount(manager, layer, tmp_path / "fs")
        files = [m for m in members if m.kind == tarfile.REGTYPE]
        reads = []
        for _ in range(400):
            member = rng.choice(files)
            offset = rng.randrange(len(member.data))
            reads.append((member, offset, rng.randint(1, 3 * SPAN_SIZE)))

        def read(job: tuple[Member, int, int]) -> bool:
            member, offset, length = job
            fd = os.open(mnt / member.name, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset) == member.data[offset : offset + length]
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(read, reads))
    finally:
        manager.unmount(str(tmp_path / "fs"))
        layer.server.stop()


def test_overlay_hides_what_the_lazy_layer_whites_out(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    lazy = _mount(manager, layer, tmp_path / "fs")
    lower = tmp_path / "lower"
    for rel, text in {
        "gone": "deleted above",
        "etc/removed": "deleted above",
        "etc/hosts": "old hosts",
        "opaque/old": "hidden by the opaque dir",
        "keep/this": "still here",
    }.items():
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_text(text)
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lazy}:{lower}", str(merged)],
        check=True,
        capture_output=True,
    )
    try:
        assert not (merged / "gone").exists()
        assert not (merged / "etc/removed").exists()
        assert sorted(os.listdir(merged / "opaque")) == ["kept"]
        assert (merged / "keep/this").read_text() == "still here"
        assert (merged / "etc/hosts").read_bytes() == layer.data("etc/hosts")
        assert (merged / "usr/lib/big.bin").read_bytes() == layer.data("usr/lib/big.bin")
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_concurrent_readers_of_one_span_cause_one_fetch(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    layer.server.delay = 0.5
    before = layer.server.request_count()
    results: list[bytes] = []

    def read_head() -> None:
        with open(mnt / "etc/shadow", "rb") as f:
            results.append(f.read())

    threads = [threading.Thread(target=read_head) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [layer.data("etc/shadow")] * 8
    assert layer.server.request_count() - before == 1


def test_a_tampered_blob_gives_eio_and_a_log_line_never_wrong_bytes(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    entry = [e for e in layer.index.entries if e.name == "usr/lib/big.bin"][-1]
    span_no = next(
        n for n, s in enumerate(layer.index.spans) if s.uncompressed_end > entry.offset + 1000
    )
    span = layer.index.spans[span_no]
    tampered = bytearray(layer.blob)
    tampered[(span.compressed_start + span.compressed_end) // 2] ^= 0x55
    layer.server.blob = bytes(tampered)
    mnt = _mount(manager, layer, tmp_path / "fs")
    with pytest.raises(OSError) as failure, open(mnt / "usr/lib/big.bin", "rb") as f:
        f.seek(1000)
        f.read(100)
    assert failure.value.errno == errno.EIO
    log = (tmp_path / "fs.lazysnap.log").read_text()
    assert f"layer {layer.index.layer_digest} span {span_no}:" in log
    assert "Traceback" not in log
    layer.server.blob = layer.blob  # repaired registry: the same read now works
    with open(mnt / "usr/lib/big.bin", "rb") as f:
        f.seek(1000)
        assert f.read(100) == layer.data("usr/lib/big.bin")[1000:1100]


def test_a_dead_registry_gives_eio_in_time_and_reads_work_once_it_is_back(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    layer.server.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        (mnt / "usr/bin/tool").read_bytes()
    assert failure.value.errno == errno.EIO
    assert time.monotonic() - started < FETCH_TIMEOUT + 2
    layer.server.start()
    assert (mnt / "usr/bin/tool").read_bytes() == layer.data("usr/bin/tool")


def test_a_cache_smaller_than_the_layer_serves_every_file(layer: Layer, tmp_path: Path) -> None:
    limit = 3 * SPAN_SIZE
    small = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), limit, fetch_timeout=FETCH_TIMEOUT)
    )
    mnt = _mount(small, layer, tmp_path / "fs")
    try:
        for name in ("usr/lib/big.bin", "usr/lib/exact.bin", "usr/bin/tool", "etc/hosts"):
            assert (mnt / name).read_bytes() == layer.data(name)
            assert SpanCache(tmp_path / "cache", limit).usage().bytes <= limit
        assert len(layer.tar) > 2 * limit
    finally:
        small.unmount(str(mnt))


def test_killing_the_parent_does_not_break_an_ongoing_read(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    spec_file = tmp_path / "index"
    spec_file.write_bytes(encode_index(layer.index))
    parent_script = (
        "import sys, time\n"
        "from snapshotter.lazylayers.layer_spec import LayerSpec\n"
        "from snapshotter.lazylayers.layers import LazyLayers\n"
        "from snapshotter.lazylayers.settings import LazyLayerSettings\n"
        "from harness.url_blob import served_blob_spec\n"
        f"blob = served_blob_spec({layer.server.url!r}, {layer.index.layer_digest!r},"
        f" {len(layer.blob)})\n"
        f"m = LazyLayers(LazyLayerSettings({str(tmp_path / 'cache')!r}, 1 << 30,"
        " fetch_timeout=30))\n"
        f"m.mount_layer({str(mnt)!r}, LayerSpec(blob, index_path={str(spec_file)!r}))\n"
        "print('mounted', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"mounted\n"
        layer.server.delay = 1.0
        requests = layer.server.request_count()
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append((mnt / "usr/bin/tool").read_bytes()))
        reader.start()
        layer.server.wait_for_requests(requests + 1)  # the read is on its way (1 s to answer)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        reader.join(timeout=30)
        assert result == [layer.data("usr/bin/tool")]
        manager.check(str(mnt), {})  # the mount process lives on, owned by nobody
    finally:
        parent.kill()
        parent.wait()
        manager.unmount(str(mnt))


def wait_for_deaths(mnt: Path, count: int) -> DeathRecord:
    deadline = time.monotonic() + 10
    while (record := read_record(str(mnt))).count < count:
        assert time.monotonic() < deadline, f"{count} death(s) not recorded: {record}"
        time.sleep(0.02)
    return record


def test_a_dead_mount_process_is_restarted_and_a_second_death_soon_after_waits_for_a_mount(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    state = read_state(str(mnt))
    assert state is not None and state["layer_digest"] == layer.index.layer_digest
    assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    os.kill(state["pid"], signal.SIGKILL)
    record = wait_for_deaths(mnt, 1)
    assert record.last[-1].pid == state["pid"] and record.last[-1].restarted
    manager.check(str(mnt), {})  # waits for the new process
    restarted = read_state(str(mnt))
    assert restarted is not None and restarted["pid"] != state["pid"]
    assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")

    os.kill(restarted["pid"], signal.SIGKILL)  # again, soon: not restarted this time
    assert not wait_for_deaths(mnt, 2).last[-1].restarted
    with pytest.raises(RemoteLayerUnavailable, match="ENOTCONN"):
        manager.check(str(mnt), {})
    assert read_record(str(mnt)).count == 2  # check() does not report it a second time
    manager.mount_layer(str(mnt), layer.spec())
    requests = layer.server.request_count()
    assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    assert layer.server.request_count() == requests  # its spans outlived the dead process
    spans = tmp_path / "cache" / "spans" / "sha256" / layer.index.layer_digest[7:]
    assert spans.is_dir()
    manager.unmount(str(mnt))
    assert not spans.exists()  # the layer's last mount is gone: so are its spans
    assert os.listdir(mnt) == [] and read_state(str(mnt)) is None
    assert read_record(str(mnt)).count == 2  # a clean unmount is no death
    with pytest.raises(RemoteLayerUnavailable, match="not mounted"):
        manager.check(str(mnt), {})


def test_a_death_after_the_restart_interval_is_restarted_again(
    layer: Layer, tmp_path: Path
) -> None:
    """The interval between restarts goes by the manager's clock."""
    clock = ManualClock()
    manager = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT, ready_timeout=30
        ),
        clock=clock,
    )
    mnt = _mount(manager, layer, tmp_path / "fs")
    try:
        for deaths in (1, 2):
            pid = (read_state(str(mnt)) or {})["pid"]
            os.kill(pid, signal.SIGKILL)
            record = wait_for_deaths(mnt, deaths)
            assert record.last[-1].pid == pid and record.last[-1].restarted
            manager.check(str(mnt), {})  # waits for the new process
            assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
            clock.advance(RESTART_MIN_INTERVAL_S)
    finally:
        manager.unmount(str(mnt))
        manager.close()


def test_a_restarted_manager_reattaches_the_live_mount(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "fs")
    pid = read_state(str(mnt))["pid"]  # type: ignore[index]
    restarted = LazyLayers(LazyLayerSettings(str(tmp_path / "cache"), 1 << 30))
    restarted.mount_layer(str(mnt), layer.spec())
    restarted.check(str(mnt), {})
    assert read_state(str(mnt))["pid"] == pid  # type: ignore[index]
    restarted.unmount(str(mnt))
    assert not is_live(str(mnt))
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            child = manager.supervisor.child(str(mnt))
            assert child is not None
            child.poll()
            time.sleep(0.05)


def test_a_bad_index_fails_the_mount_with_a_clear_reason(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    bad = LayerSpec(blob=layer.spec().blob, index_bytes=b"this is not an index")
    with pytest.raises(RemoteLayerUnavailable, match=r"index file .*fs\.lazysnap-index"):
        manager.mount_layer(str(mnt), bad)
    assert not is_live(str(mnt)) and os.listdir(mnt) == []
    assert not (tmp_path / "fs.lazysnap-index").exists()


def test_mount_by_labels_uses_the_resolver_and_reports_its_failure(
    layer: Layer, tmp_path: Path
) -> None:
    def resolve(labels: object) -> LayerSpec:
        if labels == {"layer": "known"}:
            return layer.spec()
        raise LookupError("no index for this layer")

    lazy = LazyLayers(LazyLayerSettings(str(tmp_path / "cache"), 1 << 30), resolve=resolve)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lazy.mount(str(tmp_path / "a"), {"layer": "known"})
    try:
        lazy.check(str(tmp_path / "a"), {})  # mount() only starts it; check() waits for it
        assert (tmp_path / "a/etc/hosts").read_bytes() == layer.data("etc/hosts")
        with pytest.raises(RemoteLayerUnavailable, match="no index for this layer"):
            lazy.mount(str(tmp_path / "b"), {"layer": "unknown"})
    finally:
        lazy.unmount(str(tmp_path / "a"))


def test_layers_mount_in_the_background_and_check_waits_for_them(
    layer: Layer, tmp_path: Path
) -> None:
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, mount_in_background=True),
        resolve=lambda labels: layer.spec(),
    )
    points = [tmp_path / name for name in ("a", "b", "c")]
    try:
        for point in points:
            point.mkdir()
            lazy.mount(str(point), {})
            # mount() answered before its process (a new interpreter) could have mounted.
            assert os.stat(point).st_dev == os.stat(tmp_path).st_dev
        for point in points:
            lazy.check(str(point), {})
            assert (point / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    finally:
        for point in points:
            lazy.unmount(str(point))


def test_a_mount_that_fails_after_mount_returned_is_reported_by_check_and_cleaned(
    layer: Layer, tmp_path: Path
) -> None:
    specs = {
        "bad": LayerSpec(blob=layer.spec().blob, index_bytes=b"not an index"),
        "good": layer.spec(),
    }
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, mount_in_background=True),
        resolve=lambda labels: specs[labels["k"]],
    )
    mnt = tmp_path / "fs"
    mnt.mkdir()
    lazy.mount(str(mnt), {"k": "bad"})  # discovery worked: the failure comes later
    with pytest.raises(RemoteLayerUnavailable, match=r"index file .*fs\.lazysnap-index"):
        lazy.check(str(mnt), {"k": "bad"})
    assert os.listdir(mnt) == [] and not (tmp_path / "fs.lazysnap-index").exists()
    with pytest.raises(RemoteLayerUnavailable, match="not mounted"):
        lazy.check(str(mnt), {"k": "bad"})  # reported once, then it is simply not mounted
    lazy.mount(str(mnt), {"k": "good"})
    try:
        lazy.check(str(mnt), {"k": "good"})
        assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    finally:
        lazy.unmount(str(mnt))


def test_a_mount_process_that_never_says_ready_fails_once_the_ready_timeout_passed(
    tmp_path: Path,
) -> None:
    """The ready timeout goes by the manager's clock: a process that stays silent (a fake: no
    real mount process hangs on purpose) fails its mount once the clock passed it."""
    silent = tmp_path / "silent-python"
    # Its command line names the mount process module, as the real one's does, so unmount()
    # recognises and stops it.
    silent.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import signal; signal.pause()' \"$@\"\n"
    )
    silent.chmod(0o755)
    tar = make_tar(rich_members())
    layer = Layer(tar, tar, built_index(tar, "tar"))
    clock = ManualClock()
    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            python=str(silent),
            ready_timeout=30,
            mount_in_background=True,
        ),
        clock=clock,
    )
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        lazy.mount_layer(str(mnt), layer.spec(), wait=False)
        clock.advance(29)
        assert not lazy.supervisor.startup_settled(str(mnt))  # still starting
        clock.advance(1)
        started = time.monotonic()
        with pytest.raises(RemoteLayerUnavailable, match="not ready within 30s"):
            lazy.check(str(mnt), {})
        assert time.monotonic() - started < 10  # the clock's 30 s, not real ones
        assert not is_live(str(mnt)) and os.listdir(mnt) == []
    finally:
        lazy.unmount(str(mnt))
        lazy.close()
        layer.server.stop()


WARM_CHECK = """
import os, sys
root = sys.argv[1]
fd = os.open(os.path.join(root, "etc/hosts"), os.O_RDONLY)  # open() would ioctl (isatty)
assert os.read(fd, 100) == b"127.0.0.1 localhost\\n"
os.close(fd)
assert os.readlink(os.path.join(root, "etc/link")) == "../usr/bin/tool"
os.stat(os.path.join(root, "usr/bin/tool"))
try:
    os.getxattr(os.path.join(root, "etc/hosts"), "trusted.overlay.metacopy")
except OSError as exc:
    print(exc.errno)
"""


def test_warm_files_are_served_by_the_kernel_without_the_mount_process(tmp_path: Path) -> None:
    """What a warm container start repeats (open, read, readlink, stat, overlayfs's xattr
    probes) must not wait on the Python process once seen: stop it and ask again."""
    tar = make_tar(
        [
            Member("etc/hosts", data=b"127.0.0.1 localhost\n"),
            Member("etc/link", tarfile.SYMTYPE, linkname="../usr/bin/tool", mode=0o777),
            Member("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o755),
        ]
    )
    layer = Layer(tar, tar, built_index(tar, "tar"))
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT)
    )
    mnt = tmp_path / "fs"
    mnt.mkdir()
    lazy.mount_layer(str(mnt), layer.spec())
    check = [sys.executable, "-c", WARM_CHECK, str(mnt)]
    pid = read_state(str(mnt))["pid"]  # type: ignore[index]
    try:
        cold = subprocess.run(check, capture_output=True, text=True, timeout=30, check=True)
        os.kill(pid, signal.SIGSTOP)
        try:
            warm = subprocess.run(check, capture_output=True, text=True, timeout=10, check=True)
        finally:
            os.kill(pid, signal.SIGCONT)
        # A layer without xattrs says so once; the kernel then answers for it.
        assert cold.stdout == warm.stdout == f"{errno.EOPNOTSUPP}\n"
    finally:
        lazy.unmount(str(mnt))
        layer.server.stop()


def test_a_layer_served_by_docker_registry_through_the_registry_client(
    registry: Registry, tmp_path: Path
) -> None:
    tar = make_tar(rich_members())
    index = built_index(tar, "tar")
    repository = Repository.parse(f"{registry.host}/test/fs-layer")
    with RegistryClient(HostsConfig(plain_http=[registry.host])) as client:
        client.push_blob(repository, tar)
    blob = BlobSpec(
        "registry",
        str(repository),
        digest=index.layer_digest,
        size=len(tar),
        access=RegistryAccess(plain_http=(registry.host,)),
    )
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT)
    )
    mnt = tmp_path / "fs"
    mnt.mkdir()
    since = registry.log_offset()
    lazy.mount_layer(str(mnt), LayerSpec(blob=blob, index_bytes=encode_index(index)))
    try:
        big = [e for e in index.entries if e.name == "usr/lib/big.bin"][-1]
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            assert f.read(100) == tar[big.offset : big.offset + 100]
        fetched = registry.blob_fetches(since)[index.layer_digest]
        assert 1 <= fetched.requests <= 2 and fetched.bytes < len(tar) // 2  # lazily
    finally:
        lazy.unmount(str(mnt))


def test_the_prefetch_list_is_fetched_without_being_read(layer: Layer, tmp_path: Path) -> None:
    layer.index = dataclasses.replace(layer.index, prefetch=("usr/bin/tool",))
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT)
    )
    mnt = _mount(lazy, layer, tmp_path / "fs")
    try:
        cache = SpanCache(tmp_path / "cache", 1 << 30)
        tool = [e for e in layer.index.entries if e.name == "usr/bin/tool"][-1]
        wanted = list(spans_for_range(layer.index, tool.offset, tool.offset + tool.size))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            cache.contains(layer.index.layer_digest, n) for n in wanted
        ):
            time.sleep(0.05)
        assert all(cache.contains(layer.index.layer_digest, n) for n in wanted)
        requests = layer.server.request_count()
        assert (mnt / "usr/bin/tool").read_bytes() == layer.data("usr/bin/tool")
        assert layer.server.request_count() == requests
    finally:
        lazy.unmount(str(mnt))


def test_status_lists_each_mount_with_its_counters(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = _mount(manager, layer, tmp_path / "snapshots" / "1" / "fs")
    assert (mnt / "usr/lib/big.bin").read_bytes() == layer.data("usr/lib/big.bin")
    state = read_state(str(mnt))
    assert state is not None
    deadline = time.monotonic() + 10  # counters are refreshed every couple of seconds
    while time.monotonic() < deadline and state["counters"]["spans_fetched"] == 0:
        time.sleep(0.2)
        state = read_state(str(mnt)) or state
    [status] = lazy_mounts(str(tmp_path))
    assert status.mountpoint == str(mnt) and status.problem is None
    assert status.layer_digest == layer.index.layer_digest
    assert status.counters["spans_fetched"] > 0 and status.counters["bytes_fetched"] > 0
    cached = SpanCache(str(tmp_path / "cache"), 1 << 30).usage().spans
    assert cached == status.counters["spans_cached"]
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    child = manager.supervisor.child(str(mnt))
    assert child is not None
    child.wait(timeout=10)
    assert lazy_mounts(str(tmp_path))[0].problem is not None


def _wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_profile_names_in_the_layer_spec_are_prefetched(layer: Layer, tmp_path: Path) -> None:
    lazy = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, fetch_timeout=FETCH_TIMEOUT)
    )
    spec = dataclasses.replace(layer.spec(), prefetch_names=("usr/bin/tool", "not/in/layer"))
    mnt = tmp_path / "fs"
    mnt.mkdir()
    lazy.mount_layer(str(mnt), spec)
    try:
        cache = SpanCache(tmp_path / "cache", 1 << 30)
        tool = [e for e in layer.index.entries if e.name == "usr/bin/tool"][-1]
        wanted = list(spans_for_range(layer.index, tool.offset, tool.offset + tool.size))
        assert _wait_for(lambda: all(cache.contains(layer.index.layer_digest, n) for n in wanted))
        requests = layer.server.request_count()
        assert (mnt / "usr/bin/tool").read_bytes() == layer.data("usr/bin/tool")
        assert layer.server.request_count() == requests
    finally:
        lazy.unmount(str(mnt))


def test_a_quiet_mount_converges_to_fully_local(layer: Layer, tmp_path: Path) -> None:
    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=FETCH_TIMEOUT,
            background=BackgroundSettings(quiet_seconds=0.2, rate_bytes=64 << 20),
        )
    )
    mnt = _mount(lazy, layer, tmp_path / "fs")
    try:
        assert _wait_for(lambda: (read_state(str(mnt)) or {}).get("background") == "complete")
        state = read_state(str(mnt))
        assert state is not None
        assert state["counters"]["background_spans"] == len(layer.index.spans)
        layer.server.stop()  # the registry goes away: every file is still there
        for rel, want in expected_view(layer.tar, tmp_path).items():
            if want.data is not None:
                assert (mnt / rel).read_bytes() == want.data, rel
    finally:
        lazy.unmount(str(mnt))


def test_background_fetch_can_be_switched_off(layer: Layer, tmp_path: Path) -> None:
    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=FETCH_TIMEOUT,
            background=BackgroundSettings(enabled=False, quiet_seconds=0),
        )
    )
    mnt = _mount(lazy, layer, tmp_path / "fs")
    try:
        assert (read_state(str(mnt)) or {}).get("background") == "off"
        time.sleep(0.5)
        assert layer.server.request_count() == 0
    finally:
        lazy.unmount(str(mnt))


def test_the_access_log_lists_each_file_once_in_first_read_order(
    layer: Layer, manager: LazyLayers, tmp_path: Path
) -> None:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    log_path = tmp_path / "access.log"
    manager.mount_layer(str(mnt), layer.spec(), access_log=str(log_path))
    for rel in ("usr/lib/big.bin", "etc/hosts", "usr/lib/big.bin", "usr/bin/tool-link"):
        (mnt / rel).read_bytes()
    os.stat(mnt / "usr/lib/exact.bin")  # metadata only: no data read, not a profile entry
    manager.unmount(str(mnt))
    lines = [line.split(" ", 1) for line in log_path.read_text().splitlines()]
    # a hardlink reads the data of the file it shares an inode with
    assert [json.loads(name) for _, name in lines] == [
        "usr/lib/big.bin",
        "etc/hosts",
        "usr/bin/tool",
    ]
    stamps = [int(ns) for ns, _ in lines]
    assert stamps == sorted(stamps)
