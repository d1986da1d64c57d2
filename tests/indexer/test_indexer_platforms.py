"""Platform selection in an index: what `lazysnap index build --platform` picks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snapshotter.indexer.platforms import select_platforms
from snapshotter.remote.errors import PlatformNotFound
from snapshotter.remote.manifest import OCI_INDEX, Manifest, Platform

AMD = "sha256:" + "1" * 64
ARM = "sha256:" + "2" * 64
ATT = "sha256:" + "3" * 64


def _entry(digest: str, os: str, arch: str, variant: str = "", **extra: Any) -> dict[str, Any]:
    plat = {"os": os, "architecture": arch}
    if variant:
        plat["variant"] = variant
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": 10,
        "platform": plat,
        **extra,
    }


INDEX = Manifest(
    json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                _entry(AMD, "linux", "amd64"),
                _entry(ARM, "linux", "arm64", "v8"),
                _entry(
                    ATT,
                    "unknown",
                    "unknown",
                    annotations={"vnd.docker.reference.type": "attestation-manifest"},
                ),
            ],
        }
    ).encode(),
    "sha256:" + "9" * 64,
    OCI_INDEX,
)


def test_arm64_without_variant_matches_v8_and_is_required() -> None:
    chosen = select_platforms(INDEX, [Platform.parse("linux/arm64")], all_platforms=False)
    assert [c.descriptor.digest for c in chosen] == [ARM]
    assert chosen[0].required


def test_all_platforms_skips_attestations_and_marks_entries_optional() -> None:
    chosen = select_platforms(INDEX, [], all_platforms=True)
    assert [c.descriptor.digest for c in chosen] == [AMD, ARM]
    assert not any(c.required for c in chosen)


def test_absent_platform_is_a_clear_error_listing_what_exists() -> None:
    with pytest.raises(PlatformNotFound, match=r"no manifest for platform linux/s390x.*amd64"):
        select_platforms(INDEX, [Platform.parse("linux/s390x")], all_platforms=False)


def test_same_platform_asked_twice_is_selected_once() -> None:
    asked = [Platform.parse("linux/amd64"), Platform.parse("linux/x86_64")]
    assert len(select_platforms(INDEX, asked, all_platforms=False)) == 1
