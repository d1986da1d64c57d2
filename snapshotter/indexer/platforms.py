"""Which platform manifests of an image `lazysnap index` works on.

An image reference names either one platform manifest or an index (manifest list). For an index
the user asks for platforms (`--platform os/arch[/variant]`, default this machine's) or all of
them. Attestation manifests (buildx provenance/SBOM, platform unknown/unknown) have no layers
worth indexing and are never selected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.remote.errors import PlatformNotFound
from snapshotter.remote.manifest import Descriptor, Manifest, Platform

_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class PlatformChoice:
    """One selected index entry. `required` is False for entries taken only because of
    --all-platforms: those may be absent from a sparse index and are then skipped."""

    descriptor: Descriptor
    required: bool

    @property
    def label(self) -> str:
        return str(self.descriptor.platform) if self.descriptor.platform else "-"


def _is_attestation(desc: Descriptor) -> bool:
    if _ATTESTATION_ANNOTATION in desc.annotations:
        return True
    plat = desc.platform
    return plat is not None and "unknown" in (plat.os, plat.architecture)


def select_platforms(
    index: Manifest, asked: Sequence[Platform], *, all_platforms: bool
) -> list[PlatformChoice]:
    """The index entries to work on: every platform entry with all_platforms, else the best
    match for each asked platform (this machine's when none is asked). An asked platform the
    index does not list is PlatformNotFound naming the image and what it offers."""
    candidates = [d for d in index.manifests if d.platform is not None and not _is_attestation(d)]
    if all_platforms:
        return [PlatformChoice(d, required=False) for d in candidates]
    chosen: list[PlatformChoice] = []
    for want in list(asked) or [Platform.host()]:
        ranked = [
            (rank, position, d)
            for position, d in enumerate(candidates)
            if d.platform is not None and (rank := want.match_rank(d.platform)) is not None
        ]
        if not ranked:
            offered = ", ".join(sorted({str(d.platform) for d in candidates})) or "none"
            raise PlatformNotFound(
                f"{index.where}: no manifest for platform {want.normalized()} "
                f"(the index offers: {offered})"
            )
        best = min(ranked, key=lambda item: (item[0], item[1]))[2]
        if all(c.descriptor.digest != best.digest for c in chosen):
            chosen.append(PlatformChoice(best, required=True))
    return chosen
