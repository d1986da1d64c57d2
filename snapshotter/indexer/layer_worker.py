"""Layer indexes built in worker processes, fed through a pipe.

The builder's Python parts (the tar parser, the inflate loop around zlib-ng's calls, the hash
calls) hold the GIL, so layers built on threads of one process slowed each other down: the
largest pybig layer took 1.4 s alone and 2.3-3.8 s beside the other two, worse than one layer at
a time. Each worker is its own process, so the layers use every core. The parent reads each layer
from the registry (one Range GET over the data plane) and writes it into a worker's stdin; the
worker runs build_layer_index and encode_index_split and writes the encoded index back. Download
and inflate overlap for free: different processes. Workers are started on first use and reused
for later layers (their imports are paid once), at most `count` at a time. The layer comes as a
source that pushes its bytes in order: the data plane's urllib3 stream (a fraction of httpx's CPU
per byte), or a stream read to its end (pull_from).

Protocol, one request at a time per worker:
  parent -> worker: a JSON line {"media_type", "span_size", "file_cut_min", "digest", "size"},
                    then `size` bytes.
  worker -> parent: a JSON line {"index": n, "windows": m}, then n + m bytes; or
                    {"error": message, "kind": exception type} after reading all `size` bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from snapshotter.index.errors import InvalidLayer

PIPE_BYTES = 1 << 20  # how far the download may run ahead of the worker (bounded memory)
_CHUNK = 1 << 20


class LayerWorkerError(Exception):
    """A worker failed other than by refusing the layer (it crashed, or the builder raised
    something unexpected)."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


Sink = Callable[[bytes], None]
# Pushes a layer's bytes into the sink, in order, and returns at its (verified) end.
Source = Callable[[Sink], None]


def pull_from(stream: Readable) -> Source:
    """A stream as a Source: read to its end, where a verifying stream checks size and digest
    (even past the size the request announced)."""

    def source(sink: Sink) -> None:
        while chunk := stream.read(_CHUNK):
            sink(chunk)

    return source


@dataclass(frozen=True)
class EncodedIndex:
    index_blob: bytes
    windows_blob: bytes  # b"": none (a version-1 index)


class _Refused(Exception):
    """The worker answered with an error after reading the whole request: it stays usable."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Worker:
    def __init__(self) -> None:
        # Import this very package in the child (a checkout on PYTHONPATH or the installed one),
        # and not a `snapshotter` directory that happens to be in the current directory (-P).
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "snapshotter.indexer.layer_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._to: IO[bytes] = self.process.stdin
        self._from: IO[bytes] = self.process.stdout
        with contextlib.suppress(OSError):  # a smaller pipe only means less read-ahead
            fcntl.fcntl(self._to.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def build(
        self,
        source: Source,
        *,
        media_type: str,
        span_size: int,
        file_cut_min: int,
        digest: str,
        size: int,
        progress: Callable[[int], None],
    ) -> EncodedIndex:
        request = {
            "media_type": media_type,
            "span_size": span_size,
            "file_cut_min": file_cut_min,
            "digest": digest,
        }
        sent = 0
        to_worker = self._to

        def sink(chunk: bytes) -> None:
            nonlocal sent
            progress(len(chunk))
            if sent < size:  # past `size` the source fails at its end; the worker gets no more
                part = chunk[: size - sent] if sent + len(chunk) > size else chunk
                to_worker.write(part)
                sent += len(part)

        try:
            to_worker.write(json.dumps(request | {"size": size}).encode() + b"\n")
            source(sink)
            if sent < size:  # unreachable past a verifying stream: never leave a request open
                raise LayerWorkerError(f"layer stream ended after {sent} of {size} bytes")
            self._to.flush()
        except BrokenPipeError:
            raise LayerWorkerError(
                f"index worker exited with status {self.process.wait()}"
            ) from None
        return self._reply()

    def _reply(self) -> EncodedIndex:
        line = self._from.readline()
        if not line:
            raise LayerWorkerError(f"index worker exited with status {self.process.wait()}")
        header = json.loads(line)
        if "error" in header:
            kind, message = header.get("kind", ""), str(header["error"])
            if kind == InvalidLayer.__name__:
                raise _Refused(InvalidLayer(message))
            raise _Refused(LayerWorkerError(f"{kind}: {message}"))
        index_blob = self._from.read(int(header["index"]))
        windows_blob = self._from.read(int(header["windows"]))
        if len(index_blob) != header["index"] or len(windows_blob) != header["windows"]:
            raise LayerWorkerError(f"index worker exited with status {self.process.wait()}")
        return EncodedIndex(index_blob, windows_blob)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._to.close()  # end of requests: the worker exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """For a worker left inside a request (the stream failed): it cannot be reused."""
        self.process.kill()
        self.process.wait()
        for pipe in (self._to, self._from):
            with contextlib.suppress(OSError):
                pipe.close()


class LayerWorkers:
    """Worker processes for one build: each started on first use, reused for later layers, all
    stopped by close(). Callers bound the concurrency (the --jobs thread pool)."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> LayerWorkers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self, count: int) -> None:
        """Start up to count workers now: their interpreters start while the caller looks up
        caches and opens streams, instead of once the first layer's bytes wait in the pipe."""
        with self._lock:
            missing = count - len(self._all)
        for _ in range(max(0, missing)):
            try:
                self._give_back(self._new())
            except OSError:  # no process now: the layer that needs one says why, by name
                return

    def build(
        self,
        source: Source,
        *,
        media_type: str,
        span_size: int,
        file_cut_min: int,
        digest: str,
        size: int,
        progress: Callable[[int], None],
    ) -> EncodedIndex:
        """Index the `size` bytes source pushes (all of them, or it raises; a stream goes in
        through pull_from) in a worker process. Raises InvalidLayer for a layer the builder
        refuses, LayerWorkerError if the worker fails, and whatever the source raises."""
        worker = self._take()
        try:
            encoded = worker.build(
                source,
                media_type=media_type,
                span_size=span_size,
                file_cut_min=file_cut_min,
                digest=digest,
                size=size,
                progress=progress,
            )
        except _Refused as refused:
            self._give_back(worker)
            raise refused.error from None
        except BaseException:
            worker.kill()
            raise
        self._give_back(worker)
        return encoded

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise LayerWorkerError("layer workers are closed")
            if self._idle:
                return self._idle.pop()
        return self._new()

    def _new(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.append(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = self._all, [], []
        for worker in workers:
            if worker.process.poll() is None:
                worker.close()


# -- the worker process ---------------------------------------------------------------------


class _Body:
    """The request's `size` bytes of stdin, read like an HTTP body."""

    def __init__(self, source: IO[bytes], size: int) -> None:
        self._source = source
        self.remaining = size

    def read(self, n: int = -1, /) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        if n <= 0:
            return b""
        data = self._source.read(n)
        if not data:
            raise EOFError("the parent closed the layer stream inside a request")
        self.remaining -= len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def serve(source: IO[bytes], sink: IO[bytes]) -> int:
    """Answer requests until the parent closes stdin."""
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import encode_index_split

    try:
        while line := source.readline():
            request = json.loads(line)
            body = _Body(source, int(request["size"]))
            try:
                index = build_layer_index(
                    body,
                    media_type=request["media_type"],
                    span_size=int(request["span_size"]),
                    file_cut_min=int(request["file_cut_min"]),
                    expected_digest=request["digest"],
                )
                body.drain()  # bytes the builder did not need: not the start of a next request
                blob, windows = encode_index_split(index)
            except EOFError:
                raise
            except Exception as exc:  # the parent names the layer; keep the stream in step
                body.drain()
                answer = {"error": str(exc), "kind": type(exc).__name__}
                sink.write(json.dumps(answer).encode() + b"\n")
                sink.flush()
                continue
            header = {"index": len(blob), "windows": len(windows)}
            sink.write(json.dumps(header).encode() + b"\n")
            sink.write(blob)
            sink.write(windows)
            sink.flush()
    except (EOFError, BrokenPipeError):  # the parent went away inside a request
        return 1
    return 0


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the parent stops the build, and its closed pipes
    # end the worker (no traceback of its own on the terminal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
