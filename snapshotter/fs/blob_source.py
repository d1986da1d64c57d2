"""Where a mount process reads the compressed layer blob from, described by a JSON-able spec.

kinds:
- "file": a local copy of the blob (pread); tests, and layers already on disk.
- "registry": location is the repository ("host[:port]/name"); digest and size are required;
  access (snapshotter.remote.access.RegistryAccess: hosts.toml tree, plain-http hosts, docker
  config) is how the daemon reached it. Reads go through the Range reader it builds
  (snapshotter.remote.blob.BlobReader: auth, mirrors, retries).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from snapshotter.fs import credential_channel
from snapshotter.fs.reader import BlobSource
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.errors import BlobFetchError

BLOB_KINDS = ("file", "registry")
# One quick retry: a read that outlives the fetch timeout is an EIO anyway.
LAYER_READ_RETRIES = 1


class BlobSpecError(ValueError):
    """A blob source description that cannot be used; the message names the key."""


@dataclass(frozen=True)
class BlobSpec:
    kind: str
    location: str  # file path, or repository for "registry"
    digest: str = ""  # required for "registry"; names the blob in errors otherwise
    size: int = -1  # required for "registry"
    access: RegistryAccess = field(default_factory=RegistryAccess)  # for "registry"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "digest": self.digest,
            "size": self.size,
            "access": self.access.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> BlobSpec:
        if not isinstance(obj, dict):
            raise BlobSpecError(f"blob: expected an object, got {type(obj).__name__}")
        unknown = set(obj) - {f.name for f in dataclasses.fields(cls)}
        if unknown:  # e.g. a spec written before access was one object: it would go unheeded
            raise BlobSpecError(f"blob: unknown keys {sorted(unknown)}")
        kind = obj.get("kind")
        if kind not in BLOB_KINDS:
            raise BlobSpecError(f"blob.kind: {kind!r} is not one of {', '.join(BLOB_KINDS)}")
        location = obj.get("location")
        if not isinstance(location, str) or not location:
            raise BlobSpecError("blob.location: missing or not a string")
        if not isinstance(obj.get("digest", ""), str):
            raise BlobSpecError("blob.digest: not a string")
        size = obj.get("size", -1)
        if not isinstance(size, int) or isinstance(size, bool):
            raise BlobSpecError(f"blob.size: {size!r} is not an integer")
        try:
            access = RegistryAccess.from_json(obj.get("access", {}), "blob.access")
        except ValueError as exc:
            raise BlobSpecError(str(exc)) from None
        if kind == "registry" and (not obj.get("digest") or size < 0):
            raise BlobSpecError("blob: a registry blob needs digest and size")
        return cls(
            kind=kind,
            location=location,
            digest=obj.get("digest", ""),
            size=size,
            access=access,
        )


class FileBlobSource:
    def __init__(self, path: str, digest: str = "") -> None:
        self.path = path
        self.digest = digest
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BlobSpecError(f"blob file {path}: {exc.strerror}") from exc

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BlobFetchError(
                "file", self.path, self.digest, _range(offset, length), str(exc)
            ) from None
        if len(data) != length:
            raise BlobFetchError(
                "file", self.path, self.digest, _range(offset, length), f"short read {len(data)}"
            )
        return data

    def close(self) -> None:
        os.close(self._fd)


def open_blob_source(spec: BlobSpec, *, timeout: float) -> BlobSource:
    if spec.kind == "file":
        return FileBlobSource(spec.location, spec.digest)
    return _registry_source(spec, timeout)


def _registry_source(spec: BlobSpec, timeout: float) -> BlobSource:
    from snapshotter.remote.errors import RegistryError
    from snapshotter.remote.reference import Repository

    # The mount's fetch timeout bounds each read (its deadlines are built on it).
    access = dataclasses.replace(spec.access, timeout=timeout, retries=LAYER_READ_RETRIES)
    try:
        repository = Repository.parse(spec.location)
        credentials = access.credentials()
        given = credential_channel.credentials_for(repository)  # with the image, in memory
        if given is not None:
            credentials.consult_first(given)
        return access.blob_reader(
            repository, spec.digest, spec.size, client=access.client(credentials)
        )
    except (RegistryError, ValueError) as exc:
        raise BlobSpecError(f"blob {spec.location}@{spec.digest}: {exc}") from exc


def _range(offset: int, length: int) -> str:
    return f"{offset}-{offset + length - 1}"
