"""What a container sees when things break under a lazily mounted layer, through the real stack:
the registry stops or hangs during a read, a span's bytes change in the registry, and the
snapshotter daemon is killed while a container reads."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.index.codec import decode_index
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import spans_for_range
from tests.conftest import SESSION_FETCH_TIMEOUT_S
from tests.lazy.lazy_helpers import (
    DataImage,
    LazyStack,
    build_data_image,
    mount_log,
    unique_name,
)

pytestmark = pytest.mark.stack

MIB = 1 << 20
SPAN_SIZE = 256 << 10  # small spans: each 1 MiB file covers several, fetched one by one
# `ctr run` of a busybox container costs ~1-2 s on its own here (more under load).
CONTAINER_OVERHEAD_S = 10.0


@dataclass(frozen=True)
class LazyDataImage:
    image: DataImage
    reference: str
    mountpoint: Path  # the FUSE mount of the data layer
    index: LayerIndex

    def entry(self, path: str) -> TocEntry:
        return next(e for e in self.index.entries if e.name == path)

    def spans_of(self, path: str) -> range:
        entry = self.entry(path)
        return spans_for_range(self.index, entry.offset, entry.offset + entry.size)


def lazily_pulled_data_image(
    stack: LazyStack, name: str, file_sizes: dict[str, int], span_size: int = SPAN_SIZE
) -> LazyDataImage:
    image = build_data_image(stack.workdir / name, file_sizes)
    pushed = stack.push(image.built, unique_name(f"test/{name}"))
    stack.index_build(pushed.reference, "--span-size", str(span_size))
    pulled = stack.pull(pushed.reference)
    assert (pulled.lazy, pulled.pulled) == (2, 0), pulled.stdout
    mountpoint = stack.lazy_mount(image.data_layer)
    index_file = mountpoint.with_name(mountpoint.name + ".lazysnap-index")
    index = decode_index(index_file.read_bytes(), expected_layer_digest=image.data_layer)
    return LazyDataImage(image, pushed.reference, mountpoint, index)


def cached_spans(stack: LazyStack, layer_digest: str) -> set[int]:
    directory = stack.daemon.cache_dir / "spans" / "sha256" / layer_digest.split(":", 1)[1]
    if not directory.is_dir():
        return set()
    return {int(name) for name in os.listdir(directory) if name.isdigit()}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_on_host(path: Path) -> tuple[bytes | OSError, float]:
    """Read path whole through the FUSE mount: its bytes or the error, and how long it took."""
    started = time.monotonic()
    try:
        with open(path, "rb") as f:
            data: bytes | OSError = f.read()
    except OSError as exc:
        data = exc
    return data, time.monotonic() - started


@contextlib.contextmanager
def registry_down(stack: LazyStack, how: str) -> Iterator[None]:
    """Stop the session registry (process gone: connections refused) or hang it (SIGSTOP:
    connections accepted by the kernel, never answered); always bring it back, same port and
    storage, so the rest of the session keeps its registry."""
    registry = stack.registry
    if how == "stopped":
        registry.stop()
    else:
        registry.service.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if how == "stopped":
            registry.start()
        else:
            registry.service.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_registry_gone_during_a_read_gives_eio_then_recovers(stack: LazyStack, how: str) -> None:
    """After a lazy pull, with the registry stopped (or hung), reading a file whose spans were
    never fetched fails with EIO - on the host's FUSE mount and inside a container - within the
    daemon's fetch timeout, instead of hanging; once the registry is back (same port, same
    storage) the very same reads return the right bytes."""
    lazy = lazily_pulled_data_image(
        stack, "lazy-regdown", {"first": MIB, "middle": MIB, "unread": MIB, "unread2": MIB}
    )
    files = lazy.image.files
    assert stack.run_ok(lazy.reference, "sha256sum", "/data/first").startswith(
        sha256_hex(files["data/first"])
    )
    for path in ("data/unread", "data/unread2"):
        assert not cached_spans(stack, lazy.image.data_layer) & set(lazy.spans_of(path)), (
            f"{path} was fetched before anyone read it"
        )
    limit = SESSION_FETCH_TIMEOUT_S + 1.0

    with registry_down(stack, how):
        got, host_took = read_on_host(lazy.mountpoint / "data/unread")
        assert isinstance(got, OSError) and got.errno == errno.EIO, got

        started = time.monotonic()
        result = stack.run(lazy.reference, "sh", "-c", "cat /data/unread2 >/dev/null; echo rc=$?")
        container_took = time.monotonic() - started
        assert result.stdout == "rc=1\n" and "Input/output error" in result.stderr, result

    got, _ = read_on_host(lazy.mountpoint / "data/unread")
    assert got == files["data/unread"]
    output = stack.run_ok(lazy.reference, "sha256sum", "/data/unread2")
    assert output.startswith(sha256_hex(files["data/unread2"])), output
    # One fetch timeout per read, not one per FUSE request (the kernel re-asks for the pages
    # of a failed readahead at once; that repeat must not wait a second timeout).
    eio_lines = [line for line in mount_log(lazy.mountpoint).splitlines() if "EIO" in line]
    assert host_took <= limit, f"host read: EIO after {host_took:.1f} s; {eio_lines}"
    assert container_took <= limit + CONTAINER_OVERHEAD_S, (
        f"container run: EIO after {container_took:.1f} s; {eio_lines}"
    )


def test_span_altered_in_the_registry_is_never_served(stack: LazyStack) -> None:
    """One span of a layer is changed inside the registry's storage (same blob name, same
    size). Reading across it gives EIO, the mount process log names the layer and the span, and
    the bytes the container did get are exactly the file's true prefix; with the blob repaired
    the same read succeeds (the failure is not cached)."""
    lazy = lazily_pulled_data_image(stack, "lazy-altered", {"victim": 2 * MIB, "other": MIB})
    victim = lazy.image.files["data/victim"]
    spans = lazy.spans_of("data/victim")
    assert len(spans) >= 4, spans
    bad_span = spans[len(spans) // 2]
    span = lazy.index.spans[bad_span]
    blob_file = stack.registry.blob_path(lazy.image.data_layer)
    original = blob_file.read_bytes()
    altered = bytearray(original)
    altered[(span.compressed_start + span.compressed_end) // 2] ^= 0x5A
    blob_file.write_bytes(bytes(altered))
    try:
        result = stack.run(
            lazy.reference,
            "sh",
            "-c",
            "cat /data/victim >/tmp/got; echo rc=$?; wc -c </tmp/got; sha256sum /tmp/got",
        )
        lines = result.stdout.split()
        assert lines[0] == "rc=1" and "Input/output error" in result.stderr, result
        received = int(lines[1])
        # No wrong byte: what arrived is the true prefix, and it stops before the bad span.
        assert lines[2] == sha256_hex(victim[:received]), result.stdout
        entry = lazy.entry("data/victim")
        assert received <= span.uncompressed_start - entry.offset + SPAN_SIZE, received
        assert received < len(victim)

        bad_offset = span.uncompressed_start - entry.offset
        with open(lazy.mountpoint / "data/victim", "rb") as f, pytest.raises(OSError) as raised:
            os.pread(f.fileno(), 4096, max(bad_offset, 0) + 4096)
        assert raised.value.errno == errno.EIO
        log = mount_log(lazy.mountpoint)
        assert f"layer {lazy.image.data_layer} span {bad_span}" in log, log[-2000:]
        assert bad_span not in cached_spans(stack, lazy.image.data_layer)
    finally:
        blob_file.write_bytes(original)
    output = stack.run_ok(lazy.reference, "sha256sum", "/data/victim")
    assert output.startswith(sha256_hex(victim)), output


SLOW_READER = """
echo started
i=0
while [ $i -lt 24 ]; do
  dd if=/data/big bs=1M skip=$i count=1 2>/dev/null || echo "read $i failed" >&2
  i=$((i + 1))
  sleep 0.15
done | sha256sum
echo done
sleep 600
"""


def _lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str], timeout: float, what: str) -> str:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {what} from the container within {timeout:.0f} s") from None


def test_kill_9_of_serve_while_a_container_reads_a_lazy_file(stack: LazyStack) -> None:
    """kill -9 of `lazysnap serve` in the middle of a container's lazy read: the FUSE mount is
    served by its own process, so the read completes with the right bytes and the container keeps
    running; after serve is restarted, new containers from the image start."""
    lazy = lazily_pulled_data_image(
        stack, "lazy-kill", {"big": 24 * MIB, "small": 1000}, span_size=MIB
    )
    mount_pid = _mount_pid(lazy.mountpoint)
    container_id = unique_name("lzs-kill")
    argv = [
        "ctr",
        "-a",
        str(stack.containerd.address),
        "-n",
        stack.namespace,
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        lazy.reference,
        container_id,
        "sh",
        "-c",
        SLOW_READER,
    ]
    reader = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = _lines_of(reader)
        assert _next_line(lines, 120, "start") == "started"
        time.sleep(1.0)  # some MiB read, most not yet
        assert lines.empty(), "the container finished reading before the kill"
        stack.daemon.kill()
        assert not stack.daemon.alive()

        digest = _next_line(lines, 120, "checksum").split()[0]
        assert digest == sha256_hex(lazy.image.files["data/big"]), "bytes read were wrong"
        assert _next_line(lines, 30, "done") == "done"
        tasks = stack.containerd.ctr("tasks", "ls", namespace=stack.namespace).stdout
        assert any(
            line.split()[:1] == [container_id] and "RUNNING" in line for line in tasks.splitlines()
        ), tasks
        assert _mount_pid(lazy.mountpoint) == mount_pid, "the mount process was replaced"

        stack.daemon.start()
        output = _run_once_containerd_redials(stack, lazy.reference, "sha256sum", "/data/small")
        assert output.startswith(sha256_hex(lazy.image.files["data/small"])), output
    finally:
        stack.containerd.ctr(
            "tasks", "kill", "-s", "SIGKILL", container_id, namespace=stack.namespace, check=False
        )
        try:
            reader.wait(timeout=60)
        except subprocess.TimeoutExpired:
            reader.kill()
            reader.wait()
        if not stack.daemon.alive():
            stack.daemon.start()
    assert "failed" not in (reader.stderr.read() if reader.stderr else "")


def _run_once_containerd_redials(stack: LazyStack, reference: str, *command: str) -> str:
    """containerd's connection to the proxy died with the daemon and redials with backoff, so
    the first calls after a restart may fail with "unavailable"; the image must work soon."""
    deadline = time.monotonic() + 30
    while True:
        result = stack.run(reference, *command)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        assert "unavailable" in result.stderr, result.stderr
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _mount_pid(mountpoint: Path) -> int:
    state = json.loads(mountpoint.with_name(mountpoint.name + ".lazysnap.json").read_text())
    pid = state["pid"]
    assert isinstance(pid, int)
    return pid
