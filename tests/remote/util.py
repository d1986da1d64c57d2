"""Small images and artifacts built in the test process (deterministic, no image tools)."""

from __future__ import annotations

import json
import os

from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, sha256_digest
from snapshotter.remote.reference import Repository

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def push_image(
    client: RegistryClient,
    repo: Repository,
    tag: str | None,
    layer: bytes | None = None,
    platform: tuple[str, str, str] = ("linux", "amd64", ""),
) -> Descriptor:
    """Push a one-layer image (random layer bytes unless given); returns its descriptor."""
    layer = layer if layer is not None else os.urandom(4096)
    os_name, arch, variant = platform
    config = json.dumps(
        {"architecture": arch, "os": os_name, "variant": variant, "rootfs": {"type": "layers"}}
    ).encode()
    client.push_blob(repo, layer)
    client.push_blob(repo, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": sha256_digest(layer), "size": len(layer)}
            ],
        }
    ).encode()
    pushed = client.push_manifest(repo, tag or sha256_digest(manifest), manifest, OCI_MANIFEST)
    return Descriptor(OCI_MANIFEST, pushed.digest, len(manifest))


def index_bytes(children: list[tuple[Descriptor, tuple[str, str, str]]]) -> bytes:
    manifests = []
    for desc, (os_name, arch, variant) in children:
        plat = {"os": os_name, "architecture": arch}
        if variant:
            plat["variant"] = variant
        manifests.append(
            {
                "mediaType": desc.media_type,
                "digest": desc.digest,
                "size": desc.size,
                "platform": plat,
            }
        )
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
