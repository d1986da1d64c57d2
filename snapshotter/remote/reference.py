"""Image references: `[registry[:port]/]path[:tag][@digest]`, with docker.io defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from snapshotter.remote.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"(?P<alg>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]{32,})")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::\d+)?"
)
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def validate_digest(digest: str, what: str = "digest") -> str:
    """Return digest if it is `sha256:<64 hex>` (or another well-formed algorithm), else raise."""
    match = _DIGEST.fullmatch(digest)
    if match is None or (
        match["alg"] == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", match["hex"])
    ):
        raise InvalidReference(f"invalid {what} {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def _is_registry(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.startswith("[")
    )


@dataclass(frozen=True, order=True)
class Repository:
    """A repository on a registry: `registry` is `host[:port]` as written (docker.io for Hub)."""

    registry: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        ref = Reference.parse(text)
        if ref.digest is not None or ref.tag_given:
            raise InvalidReference(f"repository {text!r} must not carry a tag or digest")
        return ref.repository

    @property
    def endpoint(self) -> str:
        """The host:port actually contacted when no hosts.toml says otherwise."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return f"{self.registry}/{self.name}"


@dataclass(frozen=True)
class Reference:
    registry: str
    name: str
    tag: str | None = None
    digest: str | None = None
    tag_given: bool = field(default=False, compare=False)  # False: implied "latest"

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or text != text.strip():
            raise InvalidReference(
                f"invalid image reference {text!r}: empty or surrounded by spaces"
            )
        rest = text
        digest: str | None = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            validate_digest(digest, f"digest in reference {text!r}")
        registry = DOCKER_HUB
        first, sep, remainder = rest.partition("/")
        if sep and _is_registry(first):
            if not _HOST.fullmatch(first):
                raise InvalidReference(f"invalid registry host {first!r} in reference {text!r}")
            registry, rest = first, remainder
        tag: str | None = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReference(f"invalid tag {tag!r} in reference {text!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in rest:
                rest = f"library/{rest}"
        if not rest or not all(_COMPONENT.fullmatch(part) for part in rest.split("/")):
            raise InvalidReference(
                f"invalid repository name {rest!r} in reference {text!r}: "
                "lowercase letters, digits and separators . _ __ - only"
            )
        tag_given = tag is not None
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, rest, tag, digest, tag_given)

    @property
    def repository(self) -> Repository:
        return Repository(self.registry, self.name)

    @property
    def endpoint(self) -> str:
        return self.repository.endpoint

    @property
    def object(self) -> str:
        """What goes after /manifests/: the digest when known (immutable), else the tag."""
        return self.digest if self.digest is not None else (self.tag or DEFAULT_TAG)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.name, self.tag, digest, self.tag_given)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.name}"
        if self.tag is not None and (self.tag_given or self.digest is None):
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
