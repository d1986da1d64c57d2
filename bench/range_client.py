"""Range-read cost of the data-plane HTTP client: lazysnap's urllib3 BlobReader against httpx.

Starts docker-registry 2.8 on loopback (harness), pushes one blob of random bytes, then
reads it whole in fixed-size Range requests, one request at a time, with each client,
interleaved per trial. Reports MB/s and client CPU seconds per GB (process CPU time, which the
noise of a shared machine disturbs less than wall-clock time).

    sudo $PY -m bench.range_client [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench import command_line
from harness.registry import start_registry
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Repository

REPO = Path(__file__).resolve().parents[1]

Reader = Callable[[int, int], bytes]


def timed_read_all(read: Reader, size: int, chunk: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to read [0, size) in chunk-sized requests."""
    wall, cpu = time.perf_counter(), time.process_time()
    for offset in range(0, size, chunk):
        length = min(chunk, size - offset)
        if len(read(offset, length)) != length:
            raise SystemExit(f"short read at {offset}")
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.range_client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=64)
    args = parser.parse_args()
    size = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="lzs-bench-http-") as base:
        registry = start_registry(Path(base) / "registry")
        try:
            client = RegistryClient(HostsConfig(plain_http=[registry.host]))
            repo = Repository(registry.host, "bench/blob")
            digest = client.push_blob(repo, os.urandom(size))
            url = f"http://{registry.host}/v2/bench/blob/blobs/{digest}"
            blob_reader = BlobReader(client, repo, digest, size)
            http = httpx.Client(timeout=30)

            def httpx_read(offset: int, length: int) -> bytes:
                headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
                return http.get(url, headers=headers).content

            clients: dict[str, Reader] = {
                "urllib3 BlobReader": blob_reader.read,
                "httpx": httpx_read,
            }
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for trial in range(args.trials):
                for chunk in (4 << 20, 256 << 10):
                    names = list(clients) if trial % 2 == 0 else list(reversed(clients))
                    for name in names:
                        results.setdefault((name, chunk), []).append(
                            timed_read_all(clients[name], size, chunk)
                        )
                print(f"trial {trial + 1}/{args.trials} done", file=sys.stderr)
            blob_reader.close()
            http.close()
        finally:
            registry.stop()
    gb = size / 1e9
    print(f"Command: `{command_line()}` ({args.trials} trials, {args.size_mb} MiB blob, ")
    print("docker-registry 2.8 on loopback, one request at a time, medians)\n")
    print("| client | request size | MB/s | client CPU s/GB |")
    print("|---|---|---|---|")
    for (name, chunk), runs in results.items():
        mbps = statistics.median(size / 1e6 / wall for wall, _ in runs)
        cpu = statistics.median(c / gb for _, c in runs)
        print(f"| {name} | {chunk >> 10} KiB | {mbps:.0f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
