"""Registry webhook bodies -> the image pushes worth indexing. Pure: bytes in, objects out.

Two senders are understood:

* docker distribution (`notifications.endpoints`), an envelope
  `{"events": [{"action": "push", "target": {"mediaType", "digest", "repository", "url",
  "tag"}, "request": {"host"}, ...}]}`. Blob pushes, pulls and deletes come through the same
  endpoint and are skipped here.
* Harbor webhooks, `{"type": "PUSH_ARTIFACT", "event_data": {"resources": [{"digest", "tag",
  "resource_url"}], "repository": {...}}}`, and the same data in Harbor's CloudEvents format
  (`"type": "harbor.artifact.pushed"`, under `"data"`).

What lazysnap itself pushes must never be indexed, else every index build triggers the next
one: the layer index cache repository, the referrers tag-schema indexes (tag `sha256-<hex>`)
and cache entries (tag `layer-sha256-<hex>`) are recognised by name here; the artifact
manifests themselves carry no tag, so the worker recognises them by their artifactType once
it has fetched them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from snapshotter.indexer.layer_cache import CACHE_REPO_NAME
from snapshotter.remote.errors import InvalidReference
from snapshotter.remote.manifest import INDEX_TYPES, MANIFEST_TYPES
from snapshotter.remote.reference import Reference, validate_digest

MAX_EVENTS = 1000  # per delivery; distribution batches a handful
_REFERRERS_TAG = re.compile(r"sha256-[0-9a-f]{64}")
_CACHE_TAG = re.compile(r"layer-sha256-[0-9a-f]{64}")
HARBOR_PUSH_TYPES = frozenset({"PUSH_ARTIFACT", "harbor.artifact.pushed"})


class PayloadError(ValueError):
    """A webhook body (or one event in it) that is not a registry notification we
    understand; the message says which field is wrong."""


@dataclass(frozen=True)
class PushedImage:
    """One manifest or index pushed to a registry: the unit of indexing work."""

    registry: str  # host[:port], as in image references
    repository: str
    digest: str
    tag: str | None = None
    media_type: str | None = None  # None when the sender does not say (Harbor)
    sender: str = "distribution"  # "distribution" | "harbor"

    @property
    def unresolved(self) -> bool:
        """Named by tag only (an acceld-style request): the digest is still to be looked up."""
        return not self.digest

    @property
    def key(self) -> tuple[str, str, str]:
        """Two pushes with the same key are the same work."""
        return (self.registry, self.repository, self.digest)

    @property
    def reference(self) -> str:
        """The immutable reference the indexer is given (the tag may move meanwhile)."""
        return f"{self.registry}/{self.repository}@{self.digest}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        return f"{self.registry}/{self.repository}{tag}@{self.digest}"


@dataclass(frozen=True)
class Skipped:
    """An event that asks for no indexing, and why. own: one of lazysnap's own pushes;
    malformed: the event could not be read (the rest of the delivery still counts)."""

    what: str
    reason: str
    own: bool = False
    malformed: bool = False


@dataclass(frozen=True)
class Delivery:
    images: tuple[PushedImage, ...]
    skipped: tuple[Skipped, ...]


def parse_delivery(body: bytes, cache_repos: Sequence[str] = ()) -> Delivery:
    """Parse one webhook body. PayloadError only if the body as a whole is not one of the two
    formats: a malformed event inside is Skipped (malformed=True), because distribution
    re-sends a refused envelope forever and would block every later event behind it.
    cache_repos: the --cache-repo list the indexer was given, besides the default cache names."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("body is not a JSON object")
    if "events" in doc:
        return _distribution(doc["events"], cache_repos)
    if "type" in doc:
        return _harbor(doc, cache_repos)
    raise PayloadError(
        "body has neither 'events' (docker distribution) nor 'type' (Harbor webhook)"
    )


def own_push(repository: str, tag: str | None, cache_repos: Sequence[str] = ()) -> str | None:
    """Why a push is one of lazysnap's own (so must not be indexed), or None."""
    if (
        repository == CACHE_REPO_NAME
        or repository in cache_repos
        or repository.endswith("/" + CACHE_REPO_NAME)
    ):
        return "lazysnap layer index cache repository"
    if tag and _REFERRERS_TAG.fullmatch(tag):
        return f"referrers tag-schema index (tag {tag})"
    if tag and _CACHE_TAG.fullmatch(tag):
        return f"lazysnap layer index cache entry (tag {tag})"
    return None


def _collect(
    items: list[Any], field: str, parse: Callable[[Any, str], PushedImage | Skipped]
) -> Delivery:
    """Parse each item of a delivery; a malformed one is skipped (and said why) so the rest
    still count: distribution re-sends a refused envelope forever."""
    images: list[PushedImage] = []
    skipped: list[Skipped] = []
    for position, item in enumerate(items):
        where = f"{field}[{position}]"
        try:
            found = parse(item, where)
        except PayloadError as exc:
            skipped.append(Skipped(where, str(exc), malformed=True))
            continue
        if isinstance(found, PushedImage):
            images.append(found)
        else:
            skipped.append(found)
    return Delivery(tuple(images), tuple(skipped))


def _distribution(events: Any, cache_repos: Sequence[str]) -> Delivery:
    if not isinstance(events, list):
        raise PayloadError("'events' is not a list")
    if len(events) > MAX_EVENTS:
        raise PayloadError(f"{len(events)} events in one delivery (limit {MAX_EVENTS})")
    return _collect(
        events, "events", lambda item, where: _distribution_event(item, where, cache_repos)
    )


def _distribution_event(
    event: Any, where: str, cache_repos: Sequence[str]
) -> PushedImage | Skipped:
    if not isinstance(event, dict):
        raise PayloadError(f"{where} is not an object")
    action = event.get("action")
    target = event.get("target")
    if not isinstance(target, dict):
        raise PayloadError(f"{where}.target is missing or not an object")
    media_type = _text(target, "mediaType", where + ".target", required=False)
    digest = _text(target, "digest", where + ".target", required=False)
    repository = _text(target, "repository", where + ".target")
    what = f"{action} {repository}@{digest or '?'}"
    if action != "push":
        return Skipped(what, f"action {action!r}, not a push")
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        # Blobs arrive as application/octet-stream; schema1 and other manifest types
        # cannot be indexed either.
        return Skipped(what, f"mediaType {media_type!r} is not an image manifest or index")
    tag = _text(target, "tag", where + ".target", required=False) or None
    own = own_push(repository, tag, cache_repos)
    if own is not None:
        return Skipped(what, own, own=True)
    registry = _registry_of(target, event.get("request"), where)
    return PushedImage(
        registry=registry,
        repository=_repository(repository, registry, where + ".target.repository"),
        digest=_digest(digest, where + ".target.digest"),
        tag=tag,
        media_type=media_type,
        sender="distribution",
    )


def _registry_of(target: dict[str, Any], request: Any, where: str) -> str:
    """host[:port] of the registry: from target.url (what the registry calls itself), else
    the Host header the push was sent to."""
    url = target.get("url")
    if isinstance(url, str) and url:
        netloc = urlsplit(url).netloc
        if netloc:
            return netloc.rsplit("@", 1)[-1]  # never keep user info
    if isinstance(request, dict) and isinstance(request.get("host"), str) and request["host"]:
        return str(request["host"])
    raise PayloadError(f"{where}: neither target.url nor request.host names the registry")


def _harbor(doc: dict[str, Any], cache_repos: Sequence[str]) -> Delivery:
    kind = doc.get("type")
    if kind not in HARBOR_PUSH_TYPES:
        return Delivery((), (Skipped(f"Harbor event {kind!r}", "not an artifact push"),))
    data = doc.get("event_data") if "event_data" in doc else doc.get("data")
    if not isinstance(data, dict):
        raise PayloadError(f"Harbor {kind}: 'event_data' (or 'data') is not an object")
    resources = data.get("resources")
    if not isinstance(resources, list):
        raise PayloadError(f"Harbor {kind}: event_data.resources is not a list")
    if len(resources) > MAX_EVENTS:
        raise PayloadError(f"{len(resources)} resources in one delivery (limit {MAX_EVENTS})")
    return _collect(
        resources,
        "event_data.resources",
        lambda item, where: _harbor_resource(item, where, cache_repos),
    )


def _harbor_resource(
    resource: Any, where: str, cache_repos: Sequence[str]
) -> PushedImage | Skipped:
    if not isinstance(resource, dict):
        raise PayloadError(f"{where} is not an object")
    url = _text(resource, "resource_url", where)
    try:
        ref = Reference.parse(url)
    except InvalidReference as exc:
        raise PayloadError(f"{where}.resource_url: {exc}") from None
    digest = _text(resource, "digest", where, required=False) or ref.digest
    tag = _text(resource, "tag", where, required=False) or (ref.tag if ref.tag_given else None)
    own = own_push(ref.name, tag, cache_repos)
    if own is not None:
        return Skipped(f"push {ref.registry}/{ref.name}", own, own=True)
    if not digest and tag:
        # acceld's documented request names only a tag: the service resolves it at intake
        # (PushedImage.unresolved).
        return PushedImage(ref.registry, ref.name, "", tag, None, "harbor")
    return PushedImage(
        registry=ref.registry,
        repository=ref.name,
        digest=_digest(digest, where + ".digest"),
        tag=tag,
        media_type=None,
        sender="harbor",
    )


def _text(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise PayloadError(f"{where}.{key} is missing")
        return ""
    if not isinstance(value, str):
        raise PayloadError(f"{where}.{key} is not a string")
    return value


def _digest(digest: str | None, where: str) -> str:
    if not digest:
        raise PayloadError(f"{where} is missing")
    try:
        return validate_digest(digest, where)
    except InvalidReference as exc:
        raise PayloadError(str(exc)) from None


def _repository(name: str, registry: str, where: str) -> str:
    """The repository name as image references spell it (validated by the same parser)."""
    try:
        return Reference.parse(f"{registry}/{name}@sha256:{'0' * 64}").name
    except InvalidReference as exc:
        raise PayloadError(f"{where}: {exc}") from None
