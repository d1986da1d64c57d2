"""`lazysnap index build --file-cut-min`: the pushed index is cut at file starts, exactly as the
builder cuts it with that option, and every file reads back from it."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, unique

from harness.images import file, layer_tar
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import decode_index, decode_window
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE, EntryType, LayerIndex
from snapshotter.index.spans import fetch_range, inflate_span, spans_for_range
from snapshotter.remote.reference import Repository

Index = Callable[..., CliResult]
FILE_CUT_MIN = 16 << 10


def _small_files_layer() -> bytes:
    """~300 small text files (~1 MB of tar, gzip ~3x): one or two 1 MiB spans by size."""
    rng = random.Random(15)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 8))) for _ in range(3000)]
    files = [
        file(f"pkg/m{i:03}.py", b" ".join(rng.choices(words, k=rng.randint(300, 900))))
        for i in range(300)
    ]
    return layer_tar(files)


def _pushed_index(
    lazysnap_index: Index, dist: Target, repo: str, layer_digest: str
) -> tuple[LayerIndex, bytes]:
    """The index `index build` pushed for the image's one layer, and its windows blob."""
    shown = lazysnap_index("show", f"{dist.host}/{repo}:v1", "--plain-http", "--json")
    assert shown.code == 0, shown.err
    [platform] = json.loads(shown.out)["platforms"]
    digest = platform["layers"][0]["index"]["digest"]
    with dist.client() as client:
        repository = Repository(dist.host, repo)
        index = decode_index(
            client.get_blob(repository, digest, MAX_INDEX_BLOB_SIZE),
            expected_layer_digest=layer_digest,
        )
        assert index.windows is not None
        return index, client.get_blob(repository, index.windows.digest, index.windows.size)


@pytest.mark.stack
def test_index_build_cuts_spans_at_file_starts_when_asked(
    lazysnap_index: Index, dist: Target, workdir: Path
) -> None:
    image = build_image(workdir, "v1", [_small_files_layer()])
    repo, other = f"{dist.namespace}/{unique('cuts')}", f"{dist.namespace}/{unique('sized')}"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
        push_image(client, image, dist.host, other, "v1")
    flags = ("--plain-http", "--min-layer-size", "65536", "--file-cut-min", str(FILE_CUT_MIN))
    built = lazysnap_index("build", f"{dist.host}/{repo}:v1", *flags)
    assert built.code == 0, built.err
    # the layer cache holds no variant of another layout: a default build cuts by size
    sized = lazysnap_index("build", f"{dist.host}/{other}:v1", *flags[:3])
    assert sized.code == 0, sized.err
    assert "1 layer indexed, 0 reused" in sized.out
    [layer] = image.layers
    blob = (image.layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]).read_bytes()
    index, windows = _pushed_index(lazysnap_index, dist, repo, layer.digest)
    default_index, _ = _pushed_index(lazysnap_index, dist, other, layer.digest)

    def local(file_cut_min: int) -> list[tuple[int, int, int]]:
        built = build_layer_index(
            io.BytesIO(blob), media_type=layer.media_type, file_cut_min=file_cut_min
        )
        return [(s.compressed_start, s.uncompressed_start, s.bits) for s in built.spans]

    pushed = [(s.compressed_start, s.uncompressed_start, s.bits) for s in index.spans]
    assert pushed == local(FILE_CUT_MIN)
    assert [(s.compressed_start, s.uncompressed_start, s.bits) for s in default_index.spans] == (
        local(0)
    )
    assert len(pushed) > 5 * len(local(0))  # by size: one or two spans for the whole layer
    # every file reads back from the pushed index (spans and windows from the registry's blobs)
    tar = gzip.decompress(blob)
    files = [entry for entry in index.entries if entry.type is EntryType.REG]
    assert len(files) == 300
    for entry in files:
        data = bytearray()
        for number in spans_for_range(index, entry.offset, entry.offset + entry.size):
            span = index.spans[number]
            frame = windows[span.window_offset : span.window_offset + span.window_length]
            start, end = fetch_range(index, number)
            window = decode_window(frame) if frame else None
            out = inflate_span(index, number, blob[start:end], window=window)
            low = max(entry.offset, span.uncompressed_start) - span.uncompressed_start
            high = min(entry.offset + entry.size, span.uncompressed_end) - span.uncompressed_start
            data += out[low:high]
        assert bytes(data) == tar[entry.offset : entry.offset + entry.size], entry.name
