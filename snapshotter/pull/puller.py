"""Pull an image into containerd the way containerd's own unpacker does, so lazysnap can mount
layers lazily: Prepare each layer's extraction snapshot *before* fetching its blob, with the
labels that name image and layer; ALREADY_EXISTS means lazysnap mounted it and committed the
target itself, so the blob is never downloaded. Other layers are fetched into the content store,
applied by containerd's diff service and committed under their chain ID.

Sequence (containerd pull.go / unpacker.go / rootfs/apply.go): lease -> index, manifest, config
blobs with GC labels -> layers bottom-up -> config label gc.ref.snapshot.<snapshotter> -> image
record -> lease released.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.pull.containerd_api import (
    AlreadyExists,
    ContainerdClient,
    ContainerdError,
    ContainerdUnreachable,
)
from snapshotter.pull.outcome import LayerOutcome, PullSummary
from snapshotter.pull.plan import (
    UNCOMPRESSED_LABEL,
    LayerStep,
    child_gc_labels,
    distribution_source_label,
    snapshot_gc_label,
)
from snapshotter.pull.resolve import (
    PullError,
    Registry,
    ResolvedImage,
    resolve_image,
)
from snapshotter.remote.manifest import Manifest, Platform
from snapshotter.remote.reference import Reference

READ_CHUNK = 1 << 20
PREPARE_ATTEMPTS = 3  # as containerd's unpacker: a key clash is retried with a new key


class Progress(Protocol):
    """What a pull reports while it runs (the CLI prints it; tests may record it)."""

    def layer_started(self, step: LayerStep, total_layers: int) -> None: ...

    def blob_chunks(self, step: LayerStep, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Pass chunks through, showing download progress."""
        ...

    def layer_done(
        self, step: LayerStep, outcome: LayerOutcome, downloaded: int, why_not_lazy: str = ""
    ) -> None:
        """why_not_lazy: for a layer the snapshotter did not mount lazily, what it recorded as
        the reason ("" when it recorded none, or for a lazy or present layer)."""
        ...


# Given the key of an extraction snapshot the snapshotter did not mount lazily, the reason it
# recorded ("<class>: <message>"), or None.
WhyNotLazy = Callable[[str], str | None]


class SilentProgress:
    def layer_started(self, step: LayerStep, total_layers: int) -> None:
        pass

    def blob_chunks(self, step: LayerStep, chunks: Iterator[bytes]) -> Iterator[bytes]:
        return chunks

    def layer_done(
        self, step: LayerStep, outcome: LayerOutcome, downloaded: int, why_not_lazy: str = ""
    ) -> None:
        pass


@dataclass(frozen=True)
class PullOptions:
    snapshotter: str = "lazysnap"
    platform: Platform = field(default_factory=Platform.host)


def _unique_part() -> str:
    # containerd uniquePart(): nanoseconds + 3 random bytes, base64url
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


@dataclass(frozen=True)
class _Blob:
    """A blob we hold in memory (index, manifest, config), described for containerd."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]
    data: bytes

    @classmethod
    def of(cls, manifest: Manifest) -> _Blob:
        return cls(manifest.media_type, manifest.digest, len(manifest.data), {}, manifest.data)


class Puller:
    def __init__(
        self,
        containerd: ContainerdClient,
        registry: Registry,
        options: PullOptions,
        progress: Progress | None = None,
        why_not_lazy: WhyNotLazy | None = None,
    ) -> None:
        self.containerd = containerd
        self.registry = registry
        self.options = options
        self.progress: Progress = progress or SilentProgress()
        self.why_not_lazy = why_not_lazy

    def pull(self, image: str) -> PullSummary:
        return self.unpack(resolve_image(self.registry, image, self.options.platform))

    def unpack(self, resolved: ResolvedImage) -> PullSummary:
        """The containerd half of a pull, from what resolve_image found."""
        image, ref, top, manifest = resolved.image, resolved.ref, resolved.top, resolved.manifest
        config, layers, steps = resolved.config, resolved.layers, resolved.steps
        config_data = resolved.config_data
        summary = PullSummary(image=image, manifest_digest=manifest.digest)
        summary.bytes_downloaded = resolved.bytes_downloaded
        with self.containerd.lease():
            # Parents are written after their children so every GC reference label points at
            # content that is already there (the lease protects all of it meanwhile anyway).
            config_blob = _Blob(config.media_type, config.digest, config.size, {}, config_data)
            self._store_small_blob(ref, config_blob, {})
            self._store_small_blob(ref, _Blob.of(manifest), child_gc_labels([config, *layers]))
            if top.is_index:
                self._store_small_blob(ref, _Blob.of(top), child_gc_labels(top.manifests))
            for step in steps:
                self.progress.layer_started(step, len(steps))
                outcome, downloaded, why = self._unpack_layer(ref, step)
                summary.outcomes.append(outcome)
                summary.bytes_downloaded += downloaded
                self.progress.layer_done(step, outcome, downloaded, why)
            if steps:
                self.containerd.update_content_labels(
                    config.digest,
                    snapshot_gc_label(self.options.snapshotter, steps[-1].chain_id),
                )
            target = _Blob.of(top)
            self.containerd.put_image(image, target, {})
        summary.seconds = time.monotonic() - resolved.started
        return summary

    # -- blobs ------------------------------------------------------------------------------

    def _source_labels(self, ref: Reference, digest: str) -> dict[str, str]:
        info = self.containerd.content_info(digest)
        existing = info.labels if info is not None else None
        return distribution_source_label(ref.registry, ref.name, existing)

    def _store_small_blob(self, ref: Reference, blob: _Blob, gc_labels: dict[str, str]) -> None:
        labels = {**gc_labels, **self._source_labels(ref, blob.digest)}
        written = self.containerd.write_content(
            _ingest_ref(blob.media_type, blob.digest), blob, [blob.data], labels
        )
        if not written:  # already there (and now leased): just (re)label it
            self.containerd.update_content_labels(blob.digest, labels)

    def _fetch_layer_blob(self, ref: Reference, step: LayerStep) -> int:
        """Make sure the layer blob is in the content store; returns bytes downloaded."""
        if self.containerd.content_info(step.blob.digest) is not None:
            # Opening a writer on an existing digest adds it to our lease, like WriteBlob.
            self.containerd.write_content(
                _ingest_ref(step.blob.media_type, step.blob.digest), step.blob, [], {}
            )
            return 0
        downloaded = 0

        def counted() -> Iterator[bytes]:
            nonlocal downloaded
            with self.registry.stream_blob(
                ref.repository, step.blob.digest, step.blob.size
            ) as stream:
                while chunk := stream.read(READ_CHUNK):  # b"" (or None) at the end
                    downloaded += len(chunk)
                    yield chunk

        labels = distribution_source_label(ref.registry, ref.name)
        self.containerd.write_content(
            _ingest_ref(step.blob.media_type, step.blob.digest),
            step.blob,
            self.progress.blob_chunks(step, counted()),
            labels,
        )
        return downloaded

    # -- layers -----------------------------------------------------------------------------

    def _unpack_layer(self, ref: Reference, step: LayerStep) -> tuple[LayerOutcome, int, str]:
        """(outcome, bytes downloaded, why the snapshotter did not mount it lazily)."""
        sn = self.options.snapshotter
        where = f"layer {step.position + 1} ({step.blob.digest}) of {ref}"
        if self.containerd.stat_snapshot(sn, step.chain_id) is not None:
            return LayerOutcome.PRESENT, 0, ""
        key = ""
        mounts = None
        for _ in range(PREPARE_ATTEMPTS):
            key = f"extract-{_unique_part()} {step.chain_id}"
            try:
                mounts = self.containerd.prepare_snapshot(sn, key, step.parent, step.labels)
                break
            except AlreadyExists:
                # The snapshotter committed the target itself: the layer is mounted lazily.
                if self.containerd.stat_snapshot(sn, step.chain_id) is not None:
                    return LayerOutcome.LAZY, 0, ""
            except ContainerdUnreachable:
                raise
            except ContainerdError as err:
                raise PullError(
                    f"{where}: {err} (is snapshotter {sn!r} configured in containerd, and for "
                    "lazysnap, is `lazysnap serve` running on the proxy plugin's socket?)"
                ) from None
        if mounts is None:
            raise PullError(f"{where}: could not prepare an extraction snapshot (key clash)")
        # Asked now: the snapshotter recorded its reason before it answered the Prepare.
        why = (self.why_not_lazy(key) or "") if self.why_not_lazy is not None else ""
        try:
            downloaded = self._fetch_layer_blob(ref, step)
            applied = self.containerd.apply_layer(step.blob, mounts)
            if applied != step.diff_id:
                raise PullError(
                    f"{where}: unpacked content has digest {applied}, but the image config "
                    f"says diff_id {step.diff_id}"
                )
            self.containerd.commit_snapshot(sn, step.chain_id, key, step.labels)
        except AlreadyExists:
            # Someone else committed the same chain ID meanwhile: theirs is as good as ours.
            self._remove_quietly(key)
            return LayerOutcome.PRESENT, 0, ""
        except BaseException:
            self._remove_quietly(key)
            raise
        self.containerd.update_content_labels(step.blob.digest, {UNCOMPRESSED_LABEL: step.diff_id})
        return LayerOutcome.PULLED, downloaded, why

    def _remove_quietly(self, key: str) -> None:
        with suppress(ContainerdError):
            self.containerd.remove_snapshot(self.options.snapshotter, key)


def _ingest_ref(media_type: str, digest: str) -> str:
    # containerd remotes.MakeRefKey: manifest-/index-/layer-/config-<digest>
    if "index" in media_type or "manifest.list" in media_type:
        kind = "index"
    elif "manifest" in media_type:
        kind = "manifest"
    elif "config" in media_type or "container.image" in media_type:
        kind = "config"
    else:
        kind = "layer"
    return f"{kind}-{digest}"
