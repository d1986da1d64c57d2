"""The static start-up profile of one platform manifest, as `index build` attaches it: the image
config and every layer's TOC from the registry and the build's own indexes, the analysis
(static_profile.py), then the profile blob pushed to the image's repository.

Layer bytes are read through the indexes just built or reused (Range requests, verified like a
mount's); a layer too small to be indexed (it is pulled whole anyway) is fetched whole, up to
MAX_UNINDEXED_BYTES per image, and indexed in memory so its TOC and whiteouts count. The
profile names only files of indexed layers: the others are not mounted lazily.

A static profile is a hint: anything that goes wrong is logged and the artifact goes without
one; it never fails the build.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

from snapshotter.index.build import build_layer_index, compression_for_media_type
from snapshotter.index.codec import decode_index
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE, LayerIndex
from snapshotter.indexer.layer_files import BlobRead, LayerFiles, ReadBudget
from snapshotter.indexer.rootfs import RootFs
from snapshotter.indexer.static_profile import (
    STATIC_PROFILE_CREATED,
    StaticAnalysis,
    analyse_image,
    static_command,
)
from snapshotter.profile.model import ProfileEntry, StartupProfile, encode_profile
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.manifest import Descriptor
from snapshotter.remote.reference import Reference, Repository
from snapshotter.vocabulary.artifact import IndexedLayer, ProfileBlob

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 4 << 20
MAX_UNINDEXED_BYTES = 64 << 20


class StaticProfileUnavailable(Exception):
    """Why this image gets no static profile (the message says)."""


@dataclass(frozen=True)
class BuiltIndex:
    """An index the build holds for a layer: its blobs in memory (just built) or only their
    digests (reused: read back from the image's repository)."""

    indexed: IndexedLayer
    index_blob: bytes | None = None
    windows_blob: bytes | None = None
    stored_in: Repository | None = None  # where blobs not in memory are (None: the image's)


@dataclass(frozen=True)
class StaticProfileResult:
    profile: StartupProfile
    analysis: StaticAnalysis
    blob: ProfileBlob  # as pushed

    def summary(self) -> str:
        return (
            f"static profile {self.blob.digest}: {len(self.profile.entries)} files "
            f"for {self.analysis.program or '-'}"
        )


def attach_static_profile(
    client: RegistryClient,
    repo: Repository,
    subject: Descriptor,
    indexes: Mapping[str, BuiltIndex],
) -> StaticProfileResult | None:
    """Analyse the image `subject` names, push its static profile blob; None (logged) when it
    has none or it cannot be made."""
    try:
        profile, analysis = static_profile(client, repo, subject, indexes)
    except (StaticProfileUnavailable, RegistryError, IndexFormatError, ValueError) as exc:
        log.warning("%s@%s: no static start-up profile: %s", repo, subject.digest, exc)
        return None
    for note in analysis.notes:
        log.info("%s@%s: static profile: %s", repo, subject.digest, note)
    if not profile.entries:
        log.info("%s@%s: static profile: no file of an indexed layer", repo, subject.digest)
        return None
    data = encode_profile(profile)
    try:
        digest = client.push_blob(repo, data)
    except RegistryError as exc:
        log.warning("%s@%s: static profile not pushed: %s", repo, subject.digest, exc)
        return None
    return StaticProfileResult(
        profile, analysis, ProfileBlob(digest, len(data), STATIC_PROFILE_CREATED)
    )


def static_profile(
    client: RegistryClient,
    repo: Repository,
    subject: Descriptor,
    indexes: Mapping[str, BuiltIndex],
    budget: ReadBudget | None = None,
) -> tuple[StartupProfile, StaticAnalysis]:
    """The static profile of the image manifest `subject` (not pushed)."""
    manifest = client.get_manifest(Reference(repo.registry, repo.name, digest=subject.digest))
    if manifest.config is None:
        raise StaticProfileUnavailable("the image manifest has no config")
    config = json.loads(client.get_blob(repo, manifest.config.digest, MAX_CONFIG_BYTES))
    if not isinstance(config, dict):
        raise StaticProfileUnavailable("the image config is not a JSON object")
    budget = budget if budget is not None else ReadBudget()
    unindexed_bytes = 0
    with ExitStack() as readers:
        layers: list[LayerFiles] = []
        for layer in manifest.layers:
            built = indexes.get(layer.digest)
            if built is not None:
                layers.append(_indexed_layer(client, repo, layer, built, budget, readers))
                continue
            unindexed_bytes += layer.size
            if unindexed_bytes > MAX_UNINDEXED_BYTES:
                raise StaticProfileUnavailable(
                    f"its unindexed layers are more than {MAX_UNINDEXED_BYTES} bytes"
                )
            layers.append(_whole_layer(client, repo, layer, budget))
        root = RootFs.from_layers([files.index.entries for files in layers])
        analysis = analyse_image(config, root, layers)
    digests = [layer.digest for layer in manifest.layers]
    entries = tuple(
        ProfileEntry(digests[number], name)
        for number, name in analysis.files
        if digests[number] in indexes
    )
    return StartupProfile(entries, static_command(config)), analysis


def _indexed_layer(
    client: RegistryClient,
    repo: Repository,
    layer: Descriptor,
    built: BuiltIndex,
    budget: ReadBudget,
    readers: ExitStack,
) -> LayerFiles:
    indexed = built.indexed
    blob = built.index_blob
    stored_in = built.stored_in or repo
    if blob is None:
        blob = client.get_blob(stored_in, indexed.index_digest, MAX_INDEX_BLOB_SIZE)
    index: LayerIndex = decode_index(blob, expected_layer_digest=layer.digest)
    layer_reader = readers.enter_context(BlobReader(client, repo, layer.digest, layer.size))
    read_windows: BlobRead | None = None
    if indexed.windows_digest:
        if built.windows_blob is not None:
            read_windows = _from_bytes(built.windows_blob)
        else:
            windows = readers.enter_context(
                BlobReader(client, stored_in, indexed.windows_digest, indexed.windows_size)
            )
            read_windows = windows.read
    return LayerFiles(index, layer_reader.read, budget, read_windows)


def _whole_layer(
    client: RegistryClient, repo: Repository, layer: Descriptor, budget: ReadBudget
) -> LayerFiles:
    compression_for_media_type(layer.media_type)  # InvalidLayer before any download
    data = client.get_blob(repo, layer.digest, max(layer.size, 1))
    index = build_layer_index(
        io.BytesIO(data), media_type=layer.media_type, expected_digest=layer.digest
    )
    return LayerFiles(index, _from_bytes(data), budget)


def _from_bytes(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: data[offset : offset + length]
