"""Errors raised by the registry client. Every message names what failed (reference, repository,
digest, URL) and never carries a credential or token: URLs are stripped of user info and query."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL without user:password and without the query (pre-signed storage URLs put secrets
    there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RegistryError(Exception):
    """Base class: anything that went wrong talking to a registry."""


class InvalidReference(RegistryError, ValueError):
    """An image reference string that cannot be parsed."""


class HostsConfigError(RegistryError, ValueError):
    """A hosts.toml that cannot be read or has invalid values."""


class CredentialsError(RegistryError):
    """A docker config.json that cannot be read, or credentials the registry refused."""


class AuthenticationError(RegistryError):
    """The registry (or its token service) refused us: 401/403 after trying what we have."""


class NotFoundError(RegistryError):
    """A manifest, blob, tag or repository that the registry says does not exist."""


class ManifestNotFound(NotFoundError):
    pass


class BlobNotFound(NotFoundError):
    pass


class DigestMismatch(RegistryError):
    """Content whose sha256 differs from the digest it was asked for."""


class InvalidManifest(RegistryError, ValueError):
    """A manifest or index that is not valid JSON of the expected shape."""


class PlatformNotFound(RegistryError):
    """No manifest for the requested platform, or the one listed is absent (sparse index)."""


def single_platform_mismatch(image: str, want: object, have: object) -> PlatformNotFound:
    """An image that is one platform manifest (no index), for have, asked for as want."""
    return PlatformNotFound(
        f"{image}: no manifest for platform {want} (the image is a single-platform manifest "
        f"for {have})"
    )


class RegistryUnavailable(RegistryError):
    """Connection errors, timeouts or 5xx/429 that outlasted the retries, on every host tried."""


class UnexpectedResponse(RegistryError):
    """An HTTP status or header the protocol does not allow at this point."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BlobFetchError(RegistryError):
    """A Range read of a blob failed. The message names registry, repository, digest, range and
    the cause."""

    def __init__(
        self, registry: str, repository: str, digest: str, byte_range: str, cause: str
    ) -> None:
        super().__init__(f"reading {registry}/{repository}@{digest} bytes {byte_range}: {cause}")
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.byte_range = byte_range
        self.cause = cause


class ReferrerPushError(RegistryError):
    """The referrers fallback tag index could not be updated without losing entries."""
