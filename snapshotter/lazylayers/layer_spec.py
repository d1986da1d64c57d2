"""What is needed to mount one layer (LayerSpec, from discovery), and turning it into the files
a mount process starts from: the index beside the mountpoint (when it came as bytes) and the
mount process's spec (fs/mount_process.MountSpec), after the node's refusals had their say."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from snapshotter import sidecars
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.mount_spec import MountSpec
from snapshotter.index.pack import LayerPack
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.private_files import replace_private


@dataclass(frozen=True)
class LayerSpec:
    """What is needed to mount one layer: its encoded index (bytes or a file) and its blob."""

    blob: BlobSpec
    index_bytes: bytes | None = None
    index_path: str | None = None
    prefetch_names: tuple[str, ...] = ()  # this layer's part of the image's startup profile
    pack: LayerPack | None = None  # and its section of the profile's start-up pack
    # For the completion check (completion.py): the layer's diffID from the image config
    # ("" when unknown: the check can then only compare the TOC, and the layer stays lazy), and
    # where the index came from (named in the refusal ledger if the check fails).
    diff_id: str = ""
    artifact_digest: str = ""
    image: str = ""

    def __post_init__(self) -> None:
        if (self.index_bytes is None) == (self.index_path is None):
            raise ValueError("LayerSpec: give exactly one of index_bytes and index_path")


Resolver = Callable[[Mapping[str, str]], LayerSpec]


def write_mount_spec(
    settings: LazyLayerSettings,
    ledger: RefusalLedger,
    mountpoint: str,
    spec: LayerSpec,
    access_log: str,
) -> Path:
    """Write the index (if given as bytes) and the mount process's spec beside mountpoint; the
    spec file. Raises RemoteLayerUnavailable if the index was refused on this node."""
    index_path = spec.index_path
    if spec.index_bytes is not None:
        index_path = str(sidecars.index_path(mountpoint))
        _write_atomically(Path(index_path), spec.index_bytes)
    assert index_path is not None
    # The bytes discovery fetched are hashed as they are, not read back from the file.
    index_digest = (
        "sha256:" + hashlib.sha256(spec.index_bytes).hexdigest()
        if spec.index_bytes is not None
        else _file_digest(index_path)
    )
    refused = ledger.refused(index_digest)
    if refused is not None:  # discovery refuses it first; this holds for any caller
        raise RemoteLayerUnavailable(
            f"index {index_digest} of layer {refused.layer_digest} failed the completion "
            f"check on this node before (refused): {refused.why}",
            reason=FallbackReason.REFUSED_INDEX,
        )
    verdict = sidecars.read_verdict(mountpoint)
    if verdict is not None and verdict.index_digest != index_digest:
        sidecars.remove_verdict(mountpoint)  # a pass speaks for its own index only
    mount_spec = MountSpec(
        mountpoint=mountpoint,
        index_path=os.path.abspath(index_path),
        blob=spec.blob,
        cache_dir=settings.cache_dir,
        cache_max_bytes=settings.cache_max_bytes,
        cache_min_free_bytes=settings.cache_reserve.min_free_bytes,
        cache_min_free_percent=settings.cache_reserve.min_free_percent,
        fetch_timeout=settings.fetch_timeout,
        workers=settings.workers,
        allow_other=settings.allow_other,
        read_ahead_kb=settings.read_ahead_kb,
        start_read_ahead_kb=settings.start_read_ahead_kb,
        read_ahead_spans=settings.read_ahead_spans,
        read_around_bytes=settings.read_around_bytes,
        read_around_scope=settings.read_around_scope,
        prefetch_names=spec.prefetch_names,
        prefetch=settings.prefetch,
        pack=spec.pack,
        background=settings.background.enabled,
        background_quiet_seconds=settings.background.quiet_seconds,
        background_rate_bytes=settings.background.rate_bytes,
        access_log=access_log,
        oom_score_adj=settings.oom_score_adj,
        diff_id=spec.diff_id,
        index_digest=index_digest,
        artifact_digest=spec.artifact_digest,
        image=spec.image,
    )
    spec_path = sidecars.spec_path(mountpoint)
    _write_atomically(spec_path, json.dumps(mount_spec.to_json(), indent=1).encode())
    return spec_path


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise RemoteLayerUnavailable(f"reading index file {path}: {exc.strerror}") from exc
    return "sha256:" + digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        replace_private(path, data)
    except OSError as exc:
        fix = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f" (the filesystem of {path.parent} is full: free space there)"
        raise RemoteLayerUnavailable(
            f"writing {path}: {exc.strerror}{fix}", FallbackReason.MOUNT
        ) from exc
