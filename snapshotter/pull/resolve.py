"""The registry half of a pull: an image reference -> its platform manifest, config and the
layer steps to unpack. Kept apart from the containerd client (grpc), so `lazysnap pull` runs it
while the containerd half is still importing and connecting: on a 20 ms link the manifest and
config requests take about as long as that import."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from snapshotter.pull.plan import (
    ImageFormatError,
    LayerStep,
    image_layers,
    layer_steps,
    parse_diff_ids,
)
from snapshotter.remote.errors import single_platform_mismatch
from snapshotter.remote.manifest import Descriptor, Manifest, Platform
from snapshotter.remote.reference import Reference, Repository


class PullError(Exception):
    """The pull failed; the message names the image and the layer or object involved."""


class BlobReader(Protocol):
    def read(self, size: int = -1, /) -> bytes | None: ...


class Registry(Protocol):
    """The registry client calls a pull needs (snapshotter.remote.client.RegistryClient)."""

    def get_manifest(self, ref: Reference) -> Manifest: ...

    def resolve_platform(self, index: Manifest, platform: Platform) -> Descriptor: ...

    def get_blob(self, repo: Repository, digest: str) -> bytes: ...

    def stream_blob(
        self, repo: Repository, digest: str, size: int | None = None
    ) -> AbstractContextManager[BlobReader]:
        """A readable stream of the blob that raises at its end if the digest is wrong."""
        ...


@dataclass(frozen=True)
class ResolvedImage:
    image: str  # as the user wrote it
    ref: Reference
    top: Manifest  # what the reference names: the platform manifest itself, or an index
    manifest: Manifest  # the platform manifest
    config: Descriptor
    config_data: bytes
    layers: Sequence[Descriptor]
    steps: Sequence[LayerStep]
    bytes_downloaded: int  # the manifests and the config
    started: float  # time.monotonic() when resolving began: a pull's duration counts from it


def resolve_image(registry: Registry, image: str, platform: Platform) -> ResolvedImage:
    """Fetch what a pull needs to know before it touches containerd. Raises PullError (bad
    reference or image format) or the registry client's RegistryError."""
    started = time.monotonic()
    try:
        ref = Reference.parse(image)
    except ValueError as err:
        raise PullError(str(err)) from None
    top = registry.get_manifest(ref)
    downloaded = len(top.data)
    manifest = top
    if top.is_index:
        chosen = registry.resolve_platform(top, platform)
        manifest = registry.get_manifest(ref.with_digest(chosen.digest))
        downloaded += len(manifest.data)
    if manifest.is_index:
        raise PullError(f"{image}: index {manifest.digest} nests another index; not supported")
    try:
        config, layers = image_layers(manifest)
    except ImageFormatError as err:
        raise PullError(f"{image}: {err}") from None
    config_data = registry.get_blob(ref.repository, config.digest)
    downloaded += len(config_data)
    if not top.is_index:  # no platform was chosen: the image's one must be the one asked for
        have = Platform.of_image_config(config_data)
        if have is not None and platform.match_rank(have) is None:
            raise single_platform_mismatch(image, platform.normalized(), have)
    try:
        diff_ids = parse_diff_ids(config_data, f"config {config.digest} of {image}")
        steps = layer_steps(str(ref), manifest.digest, config.digest, layers, diff_ids)
    except ImageFormatError as err:
        raise PullError(f"{image}: {err}") from None
    return ResolvedImage(
        image, ref, top, manifest, config, config_data, layers, steps, downloaded, started
    )
