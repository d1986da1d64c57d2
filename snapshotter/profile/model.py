"""The startup profile blob: an ordered list of (layer digest, entry name) pairs.

Bytes: one JSON object, keys sorted, no whitespace:
    {"command": "<what was run>", "entries": [["sha256:<layer>", "<entry name>"], ...],
     "version": 1}
`entries` is in first-read order across all layers of the image; a mount keeps its own layer's
names in that order. Kept apart from the layer indexes so that those stay deterministic and
shareable between images (a base layer's index serves many images, each with its own profile).
A profile is a hint: a bad one is refused with ProfileError and the layer is mounted without
prefetch, never failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PROFILE_VERSION = 1
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
class StartupProfile:
    entries: tuple[ProfileEntry, ...]
    command: str = ""

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
    doc = {
        "command": profile.command,
        "entries": [[e.layer_digest, e.name] for e in profile.entries],
        "version": PROFILE_VERSION,
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
    unknown = set(doc) - {"command", "entries", "version"}
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
    if doc.get("version") != PROFILE_VERSION:
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
    return StartupProfile(tuple(entries), command)


def _is_entry_name(name: str) -> bool:
    if not name or name.startswith("/") or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
