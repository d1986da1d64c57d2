"""Forged lazysnap indexes, for tests of what the node does with an index that lies.

Each forgery starts from a genuine index (decoded with snapshotter.index.codec) and keeps every
field decode_index checks consistent, including the span digests of the real layer blob: what
an attacker with push access to the repository (but not to the image) can publish. push_forged
then makes it the newest index artifact of the image (the one discovery uses), with the
project's own artifact push.

    remap          files A and B swap names (each keeping its mode and owner): A serves B's bytes
    change_mode    a file's mode changed (e.g. 0600 -> 0644)
    add_setuid_and_device   a setuid root-owned file and a 0666 character device added
    add_path       an extra path (e.g. etc/anything) added
    forge_window   a gzip window frame in the windows blob replaced, so a span inflates to
                   other bytes; the span's uncompressed digest recomputed to match
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from snapshotter.index.codec import decode_index, decode_window, encode_index, encode_window
from snapshotter.index.model import Compression, EntryType, LayerIndex, Span, TocEntry, WindowsBlob
from snapshotter.index.spans import _inflate_gzip  # the inflate a reader does, unchecked
from snapshotter.indexer.artifact import artifact_manifest
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import Descriptor
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import find_referrers, push_referrer
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, IndexedLayer, indexed_layers


class ForgeError(Exception):
    """The genuine index offers nothing to forge this way (named in the message)."""


@dataclass(frozen=True)
class IndexBlobs:
    """An encoded index and its windows blob (b"" for a version-1 index)."""

    index: bytes
    windows: bytes = b""

    @property
    def index_digest(self) -> str:
        return _sha256(self.index)

    def decoded(self) -> LayerIndex:
        return decode_index(self.index)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _regular(index: LayerIndex, name: str) -> TocEntry:
    for entry in index.entries:
        if entry.name == name and entry.type is EntryType.REG:
            return entry
    raise ForgeError(f"layer {index.layer_digest} has no regular file {name!r}")


def _replace_entry(index: LayerIndex, name: str, **changes: object) -> LayerIndex:
    entries = tuple(
        dataclasses.replace(e, **changes) if e.name == name else e  # type: ignore[arg-type]
        for e in index.entries
    )
    return dataclasses.replace(index, entries=entries)


def _encoded(index: LayerIndex, windows: bytes) -> IndexBlobs:
    blobs = IndexBlobs(encode_index(index), windows)
    blobs.decoded()  # every forgery must pass the decoder's checks, or it tests nothing
    return blobs


# -- TOC forgeries: the windows blob stays the genuine one ---------------------------------------


def remap(genuine: IndexBlobs, victim: str, source: str) -> IndexBlobs:
    """victim's name serves source's bytes (and source's name victim's), each keeping its own
    mode and owner: the two entries swap names, modes and owners. File data stays in tar order,
    so the index passes decode_index, which refuses entries whose data ranges overlap."""
    index = genuine.decoded()
    a, b = _regular(index, victim), _regular(index, source)

    def swapped(entry: TocEntry, other: TocEntry) -> TocEntry:
        return dataclasses.replace(
            entry,
            name=other.name,
            mode=other.mode,
            uid=other.uid,
            gid=other.gid,
            uname=other.uname,
            gname=other.gname,
        )

    entries = tuple(
        swapped(e, a) if e.name == source else swapped(e, b) if e.name == victim else e
        for e in index.entries
    )
    return _encoded(dataclasses.replace(index, entries=entries), genuine.windows)


def change_mode(genuine: IndexBlobs, name: str, mode: int) -> IndexBlobs:
    index = genuine.decoded()
    if _regular(index, name).mode == mode:
        raise ForgeError(f"{name!r} already has mode {mode:#o}")
    return _encoded(_replace_entry(index, name, mode=mode), genuine.windows)


def _after_all_data(index: LayerIndex) -> int:
    """Where an added file's (empty) data may sit: after every file's data, as in a tar. An
    added file cannot share another file's bytes: decode_index refuses overlapping data."""
    end = max((e.offset + e.size for e in index.entries if e.type is EntryType.REG), default=0)
    return min(-(-end // 512) * 512, index.uncompressed_size)


def add_setuid_and_device(
    genuine: IndexBlobs,
    setuid_name: str = "usr/bin/forged-suid",
    device_name: str = "dev/forged-tty",
) -> IndexBlobs:
    """A root-owned 04755 (empty) file and a 0666 character device 5:0."""
    index = genuine.decoded()
    added = (
        TocEntry(setuid_name, EntryType.REG, 0o4755, offset=_after_all_data(index)),
        TocEntry(device_name, EntryType.CHAR, 0o666, devmajor=5, devminor=0),
    )
    return _encoded(dataclasses.replace(index, entries=index.entries + added), genuine.windows)


def add_path(genuine: IndexBlobs, name: str = "etc/anything") -> IndexBlobs:
    index = genuine.decoded()
    added = TocEntry(name, EntryType.REG, 0o644, offset=_after_all_data(index))
    return _encoded(dataclasses.replace(index, entries=(*index.entries, added)), genuine.windows)


# -- a forged gzip window ------------------------------------------------------------------------


def forge_window(genuine: IndexBlobs, layer_blob: bytes) -> tuple[IndexBlobs, int]:
    """(forged index + windows blob, the span number forged). The first span whose inflated
    bytes change when its window's bytes do gets a window with every byte flipped (same
    length, so every back-reference stays in range) and its uncompressed digest recomputed."""
    index = genuine.decoded()
    if index.compression is not Compression.GZIP or index.windows is None:
        raise ForgeError(f"layer {index.layer_digest}: no gzip windows blob to forge")
    frames = [
        genuine.windows[s.window_offset : s.window_offset + s.window_length] for s in index.spans
    ]
    for number, span in enumerate(index.spans):
        if not span.window_length:
            continue
        window = decode_window(frames[number])
        forged_window = bytes(b ^ 0xFF for b in window)
        compressed = layer_blob[span.compressed_start : span.compressed_end]
        genuine_out = _inflate_gzip(span, compressed, window)
        forged_out = _inflate_gzip(span, compressed, forged_window)
        if forged_out == genuine_out or len(forged_out) != span.uncompressed_size:
            continue  # this span never reaches into its window
        frames[number] = encode_window(forged_window)
        return _with_frames(index, frames, number, _sha256(forged_out)), number
    raise ForgeError(f"layer {index.layer_digest}: no span's bytes depend on its window")


def _with_frames(
    index: LayerIndex, frames: list[bytes], forged: int, forged_digest: str
) -> IndexBlobs:
    spans: list[Span] = []
    offset = 0
    for number, (span, frame) in enumerate(zip(index.spans, frames, strict=True)):
        digest = forged_digest if number == forged else span.uncompressed_digest
        spans.append(
            dataclasses.replace(
                span,
                window_offset=offset,
                window_length=len(frame),
                uncompressed_digest=digest,
            )
        )
        offset += len(frame)
    windows = b"".join(frames)
    forged_index = dataclasses.replace(
        index, spans=tuple(spans), windows=WindowsBlob(_sha256(windows), len(windows))
    )
    return _encoded(forged_index, windows)


# -- the registry side ---------------------------------------------------------------------------


def genuine_index(client: RegistryClient, reference: str, layer_digest: str) -> IndexBlobs:
    """The index (and windows blob) the image's newest index artifact has for layer_digest."""
    ref = Reference.parse(reference)
    manifest = client.get_manifest(ref)
    found = find_referrers(client, ref.repository, manifest.digest, ARTIFACT_TYPE)
    chosen: IndexedLayer | None = None
    for listed in found.descriptors:
        artifact = client.get_manifest(ref.with_digest(listed.digest))
        for layer in indexed_layers(artifact):
            if layer.layer_digest == layer_digest:
                chosen = layer
    if chosen is None:
        raise ForgeError(f"{reference} has no index for layer {layer_digest}")
    index = client.get_blob(ref.repository, chosen.index_digest, max_size=256 << 20)
    windows = b""
    if chosen.windows_digest:
        windows = client.get_blob(ref.repository, chosen.windows_digest, max_size=256 << 20)
    return IndexBlobs(index, windows)


def push_forged(
    client: RegistryClient, reference: str, layer_digest: str, forged: IndexBlobs
) -> str:
    """Push forged as the newest index artifact of the image (its platform manifest); returns
    the artifact's digest."""
    ref = Reference.parse(reference)
    manifest = client.get_manifest(ref)
    subject = Descriptor(manifest.media_type, manifest.digest, len(manifest.data))
    index = forged.decoded()
    client.push_blob(
        ref.repository, b"{}"
    )  # the artifact's empty config: a fresh repository lacks it
    client.push_blob(ref.repository, forged.index)
    layer = IndexedLayer(layer_digest, forged.index_digest, len(forged.index))
    if index.windows is not None:
        client.push_blob(ref.repository, forged.windows)
        layer = dataclasses.replace(
            layer, windows_digest=index.windows.digest, windows_size=index.windows.size
        )
    return push_referrer(client, ref.repository, artifact_manifest(subject, [layer])).digest
