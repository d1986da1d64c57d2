"""Push an OCI image layout directory (as written by umoci / skopeo `oci:`) to a registry.

A helper for tests and fixtures: blobs are uploaded from the layout's files (skipping those the
registry already has), then manifests bottom-up, the top one under the reference's tag.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from snapshotter.remote.client import PushedManifest, RegistryClient
from snapshotter.remote.errors import InvalidManifest, RegistryError
from snapshotter.remote.manifest import INDEX_TYPES, Descriptor, Manifest, media_type_of
from snapshotter.remote.reference import Reference

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, hex_part = digest.split(":", 1)
    path = layout / "blobs" / algorithm / hex_part
    if not path.is_file():
        raise RegistryError(f"OCI layout {layout}: blob {digest} is missing ({path})")
    return path


def push_oci_layout(
    client: RegistryClient,
    layout_dir: str | os.PathLike[str],
    ref: Reference,
    *,
    layout_ref: str | None = None,
) -> PushedManifest:
    """Push the image named layout_ref (default: ref's tag; or the only image) from layout_dir
    to ref. Returns the pushed top manifest's digest."""
    layout = Path(layout_dir)
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"OCI layout {layout}: cannot read index.json: {exc}") from None
    entries = [Descriptor.from_json(m, f"{layout}/index.json") for m in index.get("manifests", [])]
    wanted = layout_ref or ref.tag
    chosen = [e for e in entries if e.annotations.get(REF_NAME_ANNOTATION) == wanted]
    if not chosen and layout_ref is None and len(entries) == 1:
        chosen = entries
    if len(chosen) != 1:
        names = sorted(e.annotations.get(REF_NAME_ANNOTATION, "?") for e in entries)
        raise RegistryError(f"OCI layout {layout}: no single image named {wanted!r} (has {names})")
    # Check every file first so a broken layout leaves nothing half-pushed behind.
    blobs: list[tuple[str, Path]] = []
    manifests: list[tuple[str, bytes, str]] = []
    _collect(layout, chosen[0].digest, blobs, manifests)
    for digest, path in blobs:
        client.push_blob(ref.repository, path, digest)
    for digest, data, media_type in manifests:
        client.push_manifest(ref.repository, digest, data, media_type)
    top = _blob_path(layout, chosen[0].digest).read_bytes()
    media_type = media_type_of(top, f"{layout} manifest {chosen[0].digest}")
    return client.push_manifest(
        ref.repository, ref.object if ref.digest is None else ref.digest, top, media_type
    )


def _collect(
    layout: Path,
    digest: str,
    blobs: list[tuple[str, Path]],
    manifests: list[tuple[str, bytes, str]],
) -> None:
    """Blobs and manifests under digest, children before parents (the push order)."""
    data = _blob_path(layout, digest).read_bytes()
    media_type = media_type_of(data, f"{layout} manifest {digest}")
    manifest = Manifest(data, digest, media_type)
    if media_type in INDEX_TYPES:
        for child in manifest.manifests:
            _collect(layout, child.digest, blobs, manifests)
    else:
        config = manifest.config
        if config is None:
            raise InvalidManifest(f"{layout} manifest {digest}: missing config")
        for blob in [config, *manifest.layers]:
            blobs.append((blob.digest, _blob_path(layout, blob.digest)))
    manifests.append((digest, data, media_type))
