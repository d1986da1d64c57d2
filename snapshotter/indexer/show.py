"""`lazysnap index show`: which layers of an image are indexed, and how the index is found.

For each selected platform manifest it asks find_referrers for ARTIFACT_TYPE (referrers API,
else the `sha256-<hex>` tag fallback), picks the artifact covering the most layers, and decodes
each index blob to report its span and entry counts (and a version-2 index's windows blob,
which must be the one the artifact lists), then the newest start-up profile that artifact lists
and the start-up pack the profile names (its blob, and per layer its section's place, bytes and
chunk count; the pack blob must be one the artifact lists). Read-only: nothing is pushed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from snapshotter.index.codec import decode_index
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.indexer.build import BuildOptions, Target, resolve_targets
from snapshotter.profile.model import MAX_PROFILE_BYTES, StartupProfile, decode_profile
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import ManifestNotFound
from snapshotter.remote.manifest import Manifest, Platform
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import find_referrers
from snapshotter.remote.signatures import find_signatures
from snapshotter.trust.policy import TrustPolicy, Verdict
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    PACK_MEDIA_TYPE,
    ArtifactError,
    IndexedLayer,
    artifact_contents,
    indexed_layers,
    newest_profile,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerView:
    digest: str
    size: int
    media_type: str
    index_digest: str | None = None
    index_size: int | None = None
    spans: int | None = None
    entries: int | None = None
    compression: str | None = None
    error: str | None = None  # the index blob could not be fetched or decoded
    windows_digest: str | None = None  # a version-2 index's windows blob
    windows_size: int | None = None

    @property
    def indexed(self) -> bool:
        return self.index_digest is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": self.digest,
            "size": self.size,
            "mediaType": self.media_type,
            "indexed": self.indexed,
        }
        if self.indexed:
            out["index"] = {
                "digest": self.index_digest,
                "size": self.index_size,
                "spans": self.spans,
                "entries": self.entries,
                "compression": self.compression,
            }
            if self.windows_digest:
                out["index"]["windows"] = {"digest": self.windows_digest, "size": self.windows_size}
            if self.error:
                out["index"]["error"] = self.error
        return out


@dataclass(frozen=True)
class PackSectionView:
    """One layer's section of the start-up pack: compressed bytes [offset, offset + size) of
    the pack blob, inflating to uncompressed_size bytes of the layer, in chunks frames."""

    layer_digest: str
    offset: int
    size: int
    uncompressed_size: int
    chunks: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer_digest,
            "offset": self.offset,
            "size": self.size,
            "uncompressedSize": self.uncompressed_size,
            "chunks": self.chunks,
        }


@dataclass(frozen=True)
class ProfileView:
    """The start-up profile an artifact lists, and the start-up pack it names (if any)."""

    digest: str
    size: int
    created: str
    command: str = ""
    files: int = 0
    pack_digest: str | None = None
    pack_size: int | None = None
    sections: tuple[PackSectionView, ...] = ()
    error: str | None = None  # the profile blob could not be fetched or decoded
    pack_error: str | None = None  # the pack it names is not one the artifact lists

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest, "size": self.size, "created": self.created}
        if self.error:
            out["error"] = self.error
            return out
        out["command"] = self.command
        out["files"] = self.files
        out["pack"] = None
        if self.pack_digest is not None:
            out["pack"] = {
                "digest": self.pack_digest,
                "size": self.pack_size,
                "sections": [section.to_json() for section in self.sections],
            }
            if self.pack_error:
                out["pack"]["error"] = self.pack_error
        return out

    def render(self) -> list[str]:
        created = f", created {self.created}" if self.created else ""
        lines = [f"  start-up profile {self.digest} ({self.size} bytes{created})"]
        if self.error:
            return [*lines, f"    profile unreadable: {self.error}"]
        lines.append(f"    {self.files} files, recorded from: {self.command or '-'}")
        if self.pack_digest is None:
            lines.append("  no start-up pack (built with --no-pack, or a version 1 profile)")
            return lines
        count = len(self.sections)
        lines.append(
            f"  start-up pack {self.pack_digest} ({self.pack_size} bytes), "
            f"{count} layer section{'' if count == 1 else 's'}"
        )
        if self.pack_error:
            lines.append(f"    warning: {self.pack_error}")
        lines.append(f"    {'LAYER':<71} {'OFFSET':>12} {'SIZE':>12} {'UNCOMPRESSED':>12} CHUNKS")
        lines.extend(
            f"    {s.layer_digest:<71} {s.offset:>12} {s.size:>12} {s.uncompressed_size:>12} "
            f"{s.chunks:>6}"
            for s in self.sections
        )
        return lines


@dataclass(frozen=True)
class PlatformView:
    platform: str
    manifest_digest: str
    artifact_digest: str | None
    artifact_type: str | None
    source: str | None  # "referrers-api" | "tag-fallback" | "oras"
    layers: tuple[LayerView, ...]
    trust: Verdict | None = None  # the node's decision for the artifact (with --key only)
    profile: ProfileView | None = None  # the newest start-up profile the artifact lists

    def to_json(self) -> dict[str, Any]:
        artifact: dict[str, Any] | None = None
        if self.artifact_digest is not None:
            artifact = {
                "digest": self.artifact_digest,
                "artifactType": self.artifact_type,
                "source": self.source,
            }
            if self.trust is not None:
                artifact["trusted"] = self.trust.trusted
                artifact["trust"] = self.trust.reason
        return {
            "platform": self.platform,
            "manifest": self.manifest_digest,
            "artifact": artifact,
            "layers": [layer.to_json() for layer in self.layers],
            "profile": self.profile.to_json() if self.profile is not None else None,
        }


@dataclass
class ShowReport:
    image: str
    platforms: list[PlatformView] = field(default_factory=list)
    skipped_platforms: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "platforms": [p.to_json() for p in self.platforms],
            "skipped": list(self.skipped_platforms),
        }

    def render(self) -> str:
        lines: list[str] = []
        for view in self.platforms:
            lines.append(f"{self.image} platform {view.platform} manifest {view.manifest_digest}")
            if view.artifact_digest is None:
                lines.append("  no lazysnap index (every layer is pulled whole)")
            else:
                lines.append(
                    f"  artifact {view.artifact_digest} artifactType {view.artifact_type} "
                    f"found by {view.source}"
                )
                if view.trust is not None:
                    verdict = "trusted" if view.trust.trusted else "NOT trusted"
                    lines.append(f"  {verdict}: {view.trust.reason}")
            lines.append(
                f"  {'LAYER':<71} {'SIZE':>12} {'SPANS':>6} {'ENTRIES':>8} {'INDEX SIZE':>10} "
                f"{'WINDOWS SIZE':>12}"
            )
            for layer in view.layers:
                if layer.indexed and layer.error is None:
                    windows = "-" if layer.windows_size is None else str(layer.windows_size)
                    cols = (
                        f"{layer.spans:>6} {layer.entries:>8} {layer.index_size:>10} {windows:>12}"
                    )
                elif layer.indexed:
                    cols = f"index unreadable: {layer.error}"
                else:
                    cols = f"{'-':>6} {'-':>8} {'not indexed':>10}"
                lines.append(f"  {layer.digest:<71} {layer.size:>12} {cols}")
            if view.artifact_digest is not None and not any(layer.indexed for layer in view.layers):
                lines.append(
                    f"warning: artifact {view.artifact_digest} lists no index for any layer of "
                    "this manifest: every layer is pulled whole"
                )
            if view.profile is not None:
                lines.extend(view.profile.render())
            elif view.artifact_digest is not None:
                lines.append("  no start-up profile (no prefetch, no start-up pack)")
        lines.extend(f"warning: {w}" for w in self.skipped_platforms)
        return "\n".join(lines)


def _describe_index(
    client: RegistryClient, repo: Repository, indexed: IndexedLayer
) -> dict[str, Any]:
    try:
        index = decode_index(
            client.get_blob(repo, indexed.index_digest, max_size=MAX_INDEX_BLOB_SIZE)
        )
    except Exception as exc:  # a bad blob is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    if index.layer_digest != indexed.layer_digest:
        return {"error": f"index describes {index.layer_digest}, not {indexed.layer_digest}"}
    # the index names its windows blob; the artifact must list that very blob (or readers
    # would work while registry garbage collection or a copy loses it)
    listed = (indexed.windows_digest, indexed.windows_size) if indexed.windows_digest else None
    named = (index.windows.digest, index.windows.size) if index.windows else None
    if listed != named:
        return {"error": f"index names windows blob {named}, the artifact lists {listed}"}
    return {
        "spans": len(index.spans),
        "entries": len(index.entries),
        "compression": str(index.compression),
    }


def _describe_profile(
    client: RegistryClient, repo: Repository, artifact: Manifest
) -> ProfileView | None:
    """The newest profile the artifact lists, and the pack it names; None if it lists none."""
    blob = newest_profile(None, artifact_contents(artifact).profiles)
    if blob is None:
        return None
    view = ProfileView(blob.digest, blob.size, blob.created)
    try:
        profile = decode_profile(
            client.get_blob(repo, blob.digest, max_size=MAX_PROFILE_BYTES), blob.digest
        )
    except Exception as exc:  # a bad blob is reported, not fatal
        return dataclasses.replace(view, error=f"{type(exc).__name__}: {exc}")
    view = dataclasses.replace(view, command=profile.command, files=len(profile.entries))
    return _with_pack(view, profile, artifact)


def _with_pack(view: ProfileView, profile: StartupProfile, artifact: Manifest) -> ProfileView:
    pack = profile.pack
    if pack is None:
        return view
    sections = tuple(
        PackSectionView(
            layer, section.offset, section.length, section.uncompressed_size, len(section.chunks)
        )
        for layer, section in sorted(pack.sections.items(), key=lambda item: item[1].offset)
    )
    view = dataclasses.replace(
        view, pack_digest=pack.digest, pack_size=pack.size, sections=sections
    )
    # a pack the artifact does not list is lost to registry garbage collection or a copy
    listed = {(d.digest, d.size) for d in artifact.layers if d.media_type == PACK_MEDIA_TYPE}
    if (pack.digest, pack.size) not in listed:
        problem = "the artifact does not list this pack blob (of this size)"
        return dataclasses.replace(view, pack_error=problem)
    return view


def _view(
    client: RegistryClient, repo: Repository, target: Target, trust: TrustPolicy | None
) -> PlatformView:
    found = find_referrers(client, repo, target.subject.digest, ARTIFACT_TYPE)
    best: tuple[int, str, list[IndexedLayer], Manifest] | None = None
    image_layers = {layer.digest for layer in target.layers}
    for desc in found.descriptors:
        try:
            manifest = client.get_manifest(Reference(repo.registry, repo.name, digest=desc.digest))
            layers = indexed_layers(manifest)
        except (ArtifactError, ManifestNotFound) as exc:
            log.warning("ignoring referrer %s of %s: %s", desc.digest, target.subject.digest, exc)
            continue
        covered = len(image_layers & {i.layer_digest for i in layers})
        if best is None or covered >= best[0]:
            best = (covered, desc.digest, layers, manifest)
    by_layer = {i.layer_digest: i for i in best[2]} if best else {}
    views: list[LayerView] = []
    for layer in target.layers:
        indexed = by_layer.get(layer.digest)
        if indexed is None:
            views.append(LayerView(layer.digest, layer.size, layer.media_type))
            continue
        details = _describe_index(client, repo, indexed)
        views.append(
            LayerView(
                layer.digest,
                layer.size,
                layer.media_type,
                indexed.index_digest,
                indexed.index_size,
                details.get("spans"),
                details.get("entries"),
                details.get("compression"),
                details.get("error"),
                indexed.windows_digest or None,
                indexed.windows_size if indexed.windows_digest else None,
            )
        )
    verdict = None
    if best is not None and trust is not None:
        verdict = trust.decide(best[1], find_signatures(client, repo, best[1]))
    return PlatformView(
        target.platform,
        target.subject.digest,
        best[1] if best else None,
        ARTIFACT_TYPE if best else None,
        found.source if best else None,
        tuple(views),
        verdict,
        _describe_profile(client, repo, best[3]) if best else None,
    )


def show_image_index(
    client: RegistryClient,
    image: str,
    platforms: tuple[Platform, ...] = (),
    *,
    all_platforms: bool = False,
    trust: TrustPolicy | None = None,
) -> ShowReport:
    """Describe the lazysnap index of IMAGE; with trust, also whether a node with that policy
    would use its artifact. Raises RegistryError (incl. PlatformNotFound)."""
    ref = Reference.parse(image)
    options = BuildOptions(platforms=platforms, all_platforms=all_platforms)
    targets, skipped = resolve_targets(client, ref, options)
    report = ShowReport(str(ref), skipped_platforms=skipped)
    for target in targets:
        report.platforms.append(_view(client, ref.repository, target, trust))
    return report
