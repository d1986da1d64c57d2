"""The start-up pack's size against zstd level, chunk size and build time, on a real recording.

    sudo $PY -m bench.pack_levels                       # pybig, `import numpy, pandas`
    sudo $PY -m bench.pack_levels --levels 3,19 --chunks 1M,4M -- python3 -c 'print(1)'

Starts a docker-registry (harness), pushes the image, runs `lazysnap index build --profile CMD`
(which records the workload and builds its pack at the default level), takes the bytes the
pack holds back out of it (every chunk verified as a mount would), and compresses them again
per (level, chunk size), each layer's section on its own, timing the compression alone (one
thread, like one core of a builder). Also one long-window stream of each section (what a
single frame would reach, but not verifiable chunk by chunk). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import zstandard

from bench.startup_images import build_index
from harness.containerd import write_hosts_toml
from harness.images import push, read_layout
from harness.registry import start_registry
from snapshotter.cli_types import positive_size
from snapshotter.index.pack import PackRange, compress_chunk, open_chunk, plan_chunks
from snapshotter.profile.attach import newest_index_artifact
from snapshotter.profile.model import decode_profile
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Reference
from snapshotter.vocabulary.artifact import PROFILE_MEDIA_TYPE

PYBIG = Path("/var/cache/lazysnap-test-images/pybig")
DEFAULT_COMMAND = ("python3", "-c", "import numpy, pandas")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pack_levels", description=__doc__)
    parser.add_argument("--image", type=Path, default=PYBIG, help="OCI layout (tag latest)")
    parser.add_argument("--levels", default="3,9,15,19,22")
    parser.add_argument("--chunks", default="1M,4M,16M")
    parser.add_argument("command", nargs="*", default=list(DEFAULT_COMMAND))
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    chunk_sizes = [positive_size(x) for x in args.chunks.split(",")]
    with tempfile.TemporaryDirectory(prefix="lzs-pack-levels-") as tmp:
        registry = start_registry(Path(tmp) / "registry")
        try:
            sections = _recorded_sections(registry.host, Path(tmp), args.image, args.command)
        finally:
            registry.stop()
    total = sum(len(b) for b in sections.values())
    print(f"pack of `{shlex.join(args.command)}`: {total} bytes read in {len(sections)} layers\n")
    print("| level | chunk | pack bytes | ratio | compress s (1 thread) |")
    print("|---|---|---:|---:|---:|")
    for level in levels:
        for chunk_bytes in chunk_sizes:
            size, seconds = _pack(sections, level, chunk_bytes)
            print(
                f"| {level} | {chunk_bytes >> 10} KiB | {size} | {size / total:.3f} | "
                f"{seconds:.1f} |"
            )
        size, seconds = _long_stream(sections, level)
        print(f"| {level} | one stream, window 128 MiB | {size} | {size / total:.3f} | "
              f"{seconds:.1f} |")  # fmt: skip
        sys.stdout.flush()
    return 0


def _recorded_sections(host: str, work: Path, layout: Path, command: list[str]) -> dict[str, bytes]:
    """Per layer, the bytes of its pack section (uncompressed, in pack order)."""
    image = read_layout(layout, "latest")
    pushed = push(image, host, "bench/pack-levels", "latest")
    hosts_dir = work / "hosts"
    write_hosts_toml(hosts_dir, host)
    outcome = build_index(pushed.reference, hosts_dir, ["--profile", shlex.join(command)])
    if not outcome.ok:
        raise SystemExit(f"index build --profile failed: {outcome.message}")
    print(f"index build --profile: {outcome.seconds:.1f} s: {outcome.message}", file=sys.stderr)
    client = RegistryClient(HostsConfig(plain_http=[host]), CredentialStore.anonymous())
    ref = Reference.parse(pushed.reference)
    manifest = client.get_manifest(ref)
    found = newest_index_artifact(client, ref, manifest.digest)
    assert found is not None
    [blob] = [d for d in found[0].layers if d.media_type == PROFILE_MEDIA_TYPE]
    profile = decode_profile(client.get_blob(ref.repository, blob.digest))
    assert profile.pack is not None
    pack = client.get_blob(ref.repository, profile.pack.digest, profile.pack.size)
    assert "sha256:" + hashlib.sha256(pack).hexdigest() == profile.pack.digest
    sections = {}
    for layer, section in profile.pack.sections.items():
        at, plain = section.offset, bytearray()
        for number, chunk in enumerate(section.chunks):
            plain += open_chunk(chunk, pack[at : at + chunk.compressed_size], f"chunk {number}")
            at += chunk.compressed_size
        sections[layer] = bytes(plain)
    return sections


def _pack(sections: dict[str, bytes], level: int, chunk_bytes: int) -> tuple[int, float]:
    size, seconds = 0, 0.0
    for data in sections.values():
        for planned in plan_chunks([PackRange(0, len(data))], chunk_bytes):
            piece = data[planned[0].start : planned[0].end]
            start = time.process_time()
            size += len(compress_chunk(piece, level))
            seconds += time.process_time() - start
    return size, seconds


def _long_stream(sections: dict[str, bytes], level: int) -> tuple[int, float]:
    size, seconds = 0, 0.0
    for data in sections.values():
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=27, enable_ldm=True
        )
        start = time.process_time()
        size += len(zstandard.ZstdCompressor(compression_params=params).compress(data))
        seconds += time.process_time() - start
    return size, seconds


if __name__ == "__main__":
    sys.exit(main())
