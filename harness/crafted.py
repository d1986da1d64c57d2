"""Index blobs crafted byte by byte (docs/index-format.md "Index blob bytes"): valid ones of any
size, and hostile ones no builder would write (compression bombs, shapes the kernel cannot hold).

Shared by the codec tests, the fuzz campaign, the stack tests that push a bomb as an image's
index, and bench/index_decode_memory.py.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import zstandard

MAGIC = b"LZSNAPIX"
ZERO_DIGEST = "sha256:" + "0" * 64
Document = dict[str, Any]


def frame(chunks: Iterable[bytes]) -> bytes:
    """One zstd frame of the chunks, streamed (a 160 MiB bomb never sits in memory whole)."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    out = [compressor.compress(chunk) for chunk in chunks]
    out.append(compressor.flush())
    return b"".join(out)


def index_blob(
    json_text: bytes | Iterable[bytes],
    json_len: int,
    blob: bytes = b"",
    *,
    version: int = 1,
    payload_len: int | None = None,
) -> bytes:
    """Header + one zstd frame of (u32 JSON length, the JSON, blob section). payload_len
    defaults to the true payload length; give another to make the header lie."""
    text = [json_text] if isinstance(json_text, bytes) else json_text
    true_len = 4 + json_len + len(blob)
    chunks: Iterator[bytes] = iter([struct.pack(">I", json_len), *text, blob])
    header = struct.pack(">8sHHQ", MAGIC, version, 0, true_len if payload_len is None else
                         payload_len)  # fmt: skip
    return header + frame(chunks)


def document_blob(document: Document, blob: bytes = b"", *, version: int = 1) -> bytes:
    text = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return index_blob(text, len(text), blob, version=version)


SPAN = 64 << 20


def layer_document(entries: list[list[Any]], uncompressed_size: int) -> Document:
    """A version-1 document for an uncompressed layer of that size: 64 MiB spans, no
    windows (the digests are zeros: nothing here is read through a span)."""
    spans = [
        [start, end, start, end, ZERO_DIGEST, ZERO_DIGEST, 0, 0, 0]
        for start in range(0, uncompressed_size, SPAN)
        for end in [min(start + SPAN, uncompressed_size)]
    ]
    return {
        "compressed_size": uncompressed_size,
        "compression": "none",
        "entries": entries,
        "layer_digest": ZERO_DIGEST,
        "layer_media_type": "application/vnd.oci.image.layer.v1.tar",
        "prefetch": [],
        "span_size": 1 << 20,
        "spans": spans,
        "uncompressed_size": uncompressed_size,
    }


def entry(
    name: str, kind: str = "reg", *, size: int = 0, offset: int = 0, mode: int = 0o644,
    link: str = "",
) -> list[Any]:  # fmt: skip
    return [name, kind, mode, 0, 0, "root", "root", size, 1_700_000_000_000_000_000, link, 0,
            0, offset, []]  # fmt: skip


def many_entries(count: int, *, file_size: int = 100) -> Document:
    """count regular files in directories of 100, laid out as tar would (header, then data
    padded to 512 bytes): a valid document whose size tracks count."""
    entries = [entry("", "dir", mode=0o755)]
    offset = 512
    for i in range(count):
        entries.append(entry(f"usr/lib/pkg{i // 100}/module_{i}.py", size=file_size,
                             offset=offset))  # fmt: skip
        offset += 512 + (file_size + 511) // 512 * 512
    return layer_document(entries, offset + 1024)


def empty_lists_bomb(json_bytes: int, padding: int = 0) -> bytes:
    """The bomb of issue 12: a JSON document of `[[],[],...]` json_bytes long, a few KB of
    zstd; json.loads would build one Python list per 3 bytes. padding: that many random
    (incompressible) bytes in the blob section, to make the blob as big as a cap on the
    compression ratio asks."""
    count = (json_bytes - 2) // 3
    piece = b"[]," * 65536

    def text() -> Iterator[bytes]:
        yield b"["
        left = count
        while left > 0:
            take = min(left, 65536)
            yield piece[: 3 * take] if take < 65536 else piece
            left -= take
        yield b"[]]"

    return index_blob(text(), 3 * count + 4, os.urandom(padding))


def short_strings_bomb(count: int, padding: int = 0) -> bytes:
    """`["ab","ab",...]`: json.loads makes a new ~56-byte str per 5 bytes of text (only dict
    keys are shared), the costliest JSON per value counted."""
    piece = b'"ab",' * 65536

    def text() -> Iterator[bytes]:
        yield b"["
        left = count
        while left > 0:
            take = min(left, 65536)
            yield piece[: 5 * take] if take < 65536 else piece
            left -= take
        yield b'"ab"]'

    return index_blob(text(), 5 * count + 6, os.urandom(padding))
