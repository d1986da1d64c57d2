"""OCI / Docker manifest and index documents: media types, descriptors, platforms. No I/O."""

from __future__ import annotations

import hashlib
import json
import platform as host_platform
from dataclasses import dataclass, field
from typing import Any

from snapshotter.remote.errors import InvalidManifest
from snapshotter.remote.reference import Reference, validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# The archived ORAS artifacts spec: what its referrers endpoint lists. It has `blobs` where an
# OCI manifest has `layers` (and no config).
ORAS_ARTIFACT_MANIFEST = "application/vnd.cncf.oras.artifact.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join(
    (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ORAS_ARTIFACT_MANIFEST)
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
}
# Variants a CPU of the given arm variant can also run, best first (like containerd's matcher).
_ARM_COMPATIBLE = {
    "v8": ("v8", "v7", "v6", "v5"),
    "v7": ("v7", "v6", "v5"),
    "v6": ("v6", "v5"),
    "v5": ("v5",),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. linux/arm64/v8."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "").normalized()

    @classmethod
    def host(cls) -> Platform:
        return cls("linux", host_platform.machine()).normalized()

    @classmethod
    def from_json(cls, obj: Any) -> Platform | None:
        if not isinstance(obj, dict):
            return None
        return cls(
            str(obj.get("os", "")), str(obj.get("architecture", "")), str(obj.get("variant", ""))
        )

    @classmethod
    def of_image_config(cls, config: bytes) -> Platform | None:
        """The platform an image config names (its os, architecture and variant); None when it
        names none (or is not a JSON object): then nothing can be checked against it."""
        try:
            obj = json.loads(config)
        except ValueError:
            return None
        found = cls.from_json(obj)
        if found is None or not found.os or not found.architecture:
            return None
        return found.normalized()

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture.lower(), self.architecture.lower())
        variant = self.variant.lower()
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"  # arm64 without a variant means v8 (image-spec, containerd)
        elif arch == "arm" and variant in ("", "7"):
            variant = "v7"
        return Platform(self.os.lower(), arch, variant)

    def match_rank(self, candidate: Platform) -> int | None:
        """None when an image for candidate cannot run here; lower is a better match."""
        want, have = self.normalized(), candidate.normalized()
        if want.os != have.os or want.architecture != have.architecture:
            return None
        if want.architecture == "arm":
            compatible = _ARM_COMPATIBLE.get(want.variant, (want.variant,))
            return compatible.index(have.variant) if have.variant in compatible else None
        if want.variant and have.variant and want.variant != have.variant:
            return None
        return 0

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidManifest(f"{where}: descriptor is not a JSON object")
        digest, size, media_type = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise InvalidManifest(f"{where}: descriptor needs a string digest and a size >= 0")
        try:
            validate_digest(digest, f"digest in {where}")
        except ValueError as exc:
            raise InvalidManifest(str(exc)) from None
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidManifest(f"{where}: annotations of {digest} are not an object")
        artifact_type = obj.get("artifactType")
        return cls(
            media_type=str(media_type),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            artifact_type=str(artifact_type) if artifact_type else None,
            platform=Platform.from_json(obj.get("platform")),
        )

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            obj["platform"] = plat
        return obj


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as the registry sent it (bytes are what the digest covers)."""

    data: bytes
    digest: str
    media_type: str
    reference: Reference | None = None  # where it was fetched from (repository + digest)
    etag: str | None = None  # for conditional updates (If-Match) where the registry offers them

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"manifest {self.where} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidManifest(f"manifest {self.where} is not a JSON object")
        return obj

    @property
    def where(self) -> str:
        return str(self.reference) if self.reference is not None else self.digest

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def _descriptors(self, key: str) -> list[Descriptor]:
        items = self.json().get(key) or []
        if not isinstance(items, list):
            raise InvalidManifest(f"manifest {self.where}: {key!r} is not a list")
        return [
            Descriptor.from_json(item, f"{self.where} {key}[{i}]") for i, item in enumerate(items)
        ]

    @property
    def manifests(self) -> list[Descriptor]:
        return self._descriptors("manifests")

    @property
    def layers(self) -> list[Descriptor]:
        """The layers, or an ORAS artifact manifest's blobs (its equivalent)."""
        if self.media_type == ORAS_ARTIFACT_MANIFEST:
            return self._descriptors("blobs")
        return self._descriptors("layers")

    @property
    def config(self) -> Descriptor | None:
        obj = self.json().get("config")
        return None if obj is None else Descriptor.from_json(obj, f"{self.where} config")

    @property
    def subject(self) -> Descriptor | None:
        obj = self.json().get("subject")
        return None if obj is None else Descriptor.from_json(obj, f"{self.where} subject")

    @property
    def artifact_type(self) -> str | None:
        """artifactType, else config.mediaType (what the referrers API reports)."""
        obj = self.json()
        if obj.get("artifactType"):
            return str(obj["artifactType"])
        config = obj.get("config")
        if isinstance(config, dict) and config.get("mediaType"):
            return str(config["mediaType"])
        return None

    @property
    def annotations(self) -> dict[str, str]:
        raw = self.json().get("annotations") or {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def media_type_of(data: bytes, where: str) -> str:
    """The mediaType field of a manifest document, guessing OCI manifest/index when absent."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidManifest(f"{where} is not a JSON object")
    if obj.get("mediaType"):
        return str(obj["mediaType"])
    return OCI_INDEX if "manifests" in obj else OCI_MANIFEST


def build_index(descriptors: list[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in descriptors],
    }
    if annotations:
        obj["annotations"] = annotations
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()
