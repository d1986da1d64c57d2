"""The startup profile blob: an ordered list of (layer digest, entry name) pairs.

Bytes: one JSON object, keys sorted, no whitespace:
    {"command": "<what was run>", "entries": [["sha256:<layer>", "<entry name>"], ...],
     "pack": {"digest": "sha256:<pack blob>", "size": N,
              "sections": {"sha256:<layer>": <index.pack.PackSection JSON>, ...}},
     "version": 2}
`entries` is in first-read order across all layers of the image; a mount keeps its own layer's names
in that order. `pack` (version 2, optional) names the start-up pack blob listed in the same artifact
and, per layer, the section of it holding the bytes that layer's files were read at, with a sha256
per chunk (snapshotter/index/pack.py): this signed blob is what the pack's bytes are verified
against. Version 1 (no pack) is still read. Kept apart from the layer indexes so that those stay
deterministic and shareable between images (a base layer's index serves many images, each with its
own profile). A profile is a hint: a bad one is refused with ProfileError and the layer is mounted
without prefetch, never failed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshotter.index.pack import LayerPack, PackError, PackSection, section_from_json

PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_PROFILE_BYTES = 64 << 20
MAX_ENTRIES = 1 << 20
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


class ProfileError(ValueError):
    """A profile blob that cannot be used; the message names the field or entry."""


@dataclass(frozen=True)
class ProfileEntry:
    layer_digest: str
    name: str  # entry name as in the layer index TOC (relative, no "./")


@dataclass(frozen=True)
class ProfilePack:
    """The start-up pack blob and each layer's section of it."""

    digest: str
    size: int
    sections: Mapping[str, PackSection] = field(default_factory=dict)


@dataclass(frozen=True)
class StartupProfile:
    entries: tuple[ProfileEntry, ...]
    command: str = ""
    pack: ProfilePack | None = None

    def pack_for(self, layer_digest: str) -> LayerPack | None:
        """This layer's section of the start-up pack; None without one."""
        if self.pack is None or layer_digest not in self.pack.sections:
            return None
        return LayerPack(self.pack.digest, self.pack.size, self.pack.sections[layer_digest])

    def names_for(self, layer_digest: str) -> tuple[str, ...]:
        """This layer's entry names, in first-read order, each once."""
        seen: dict[str, None] = {}
        for entry in self.entries:
            if entry.layer_digest == layer_digest:
                seen.setdefault(entry.name)
        return tuple(seen)

    def layers(self) -> set[str]:
        return {entry.layer_digest for entry in self.entries}


def encode_profile(profile: StartupProfile) -> bytes:
    doc: dict[str, Any] = {
        "command": profile.command,
        "entries": [[e.layer_digest, e.name] for e in profile.entries],
        "version": PROFILE_VERSION,
    }
    if profile.pack is not None:
        doc["pack"] = {
            "digest": profile.pack.digest,
            "size": profile.pack.size,
            "sections": {layer: s.to_json() for layer, s in profile.pack.sections.items()},
        }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_profile(data: bytes, where: str = "profile") -> StartupProfile:
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{where}: {len(data)} bytes, more than {MAX_PROFILE_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProfileError(f"{where}: not a JSON object")
    unknown = set(doc) - {"command", "entries", "version", "pack"}
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
    if doc.get("version") not in READABLE_VERSIONS:
        raise ProfileError(f"{where}: version {doc.get('version')!r} is not supported")
    command = doc.get("command", "")
    if not isinstance(command, str):
        raise ProfileError(f"{where}: command is not a string")
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise ProfileError(f"{where}: entries is missing or not a list")
    if len(raw) > MAX_ENTRIES:
        raise ProfileError(f"{where}: {len(raw)} entries, more than {MAX_ENTRIES}")
    entries = []
    for i, item in enumerate(raw):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(part, str) for part in item)
        ):
            raise ProfileError(f"{where}: entries[{i}] is not [layer digest, name]")
        layer, name = item
        if not _DIGEST.match(layer):
            raise ProfileError(f"{where}: entries[{i}]: {layer!r} is not a sha256 digest")
        if not _is_entry_name(name):
            raise ProfileError(f"{where}: entries[{i}]: {name!r} is not a relative entry name")
        entries.append(ProfileEntry(layer, name))
    pack = None
    if "pack" in doc:
        if doc["version"] < 2:
            raise ProfileError(f"{where}: a version {doc['version']} profile has no pack")
        pack = _decode_pack(doc["pack"], where)
    return StartupProfile(tuple(entries), command, pack)


def _decode_pack(raw: object, where: str) -> ProfilePack:
    if not isinstance(raw, dict) or set(raw) != {"digest", "size", "sections"}:
        raise ProfileError(f"{where}: pack is not an object with digest, size and sections")
    digest, size, sections = raw["digest"], raw["size"], raw["sections"]
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ProfileError(f"{where}: pack.digest {digest!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ProfileError(f"{where}: pack.size {size!r} is not a positive integer")
    if not isinstance(sections, dict):
        raise ProfileError(f"{where}: pack.sections is not an object")
    decoded: dict[str, PackSection] = {}
    for layer, section in sections.items():
        if not _DIGEST.match(layer):
            raise ProfileError(f"{where}: pack.sections key {layer!r} is not a sha256 digest")
        try:
            decoded[layer] = section_from_json(section, size, f"{where}: pack.sections[{layer}]")
        except PackError as exc:
            raise ProfileError(str(exc)) from None
    return ProfilePack(digest, size, decoded)


def _is_entry_name(name: str) -> bool:
    if not name or name.startswith("/") or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
