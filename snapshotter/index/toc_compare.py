"""Compare an index's TOC with the TOC parsed from the layer's own tar stream.

The completion check (lazylayers/completion.py) re-parses the fully fetched tar stream from
byte 0 with TarTocParser and asks here whether the index said exactly the same: same entries in
the same order, every field equal. The answer names the first difference, so an operator reads
*what* a forged index changed (a mode, a data offset, an added path) in the log.
"""

from __future__ import annotations

from collections.abc import Sequence

from snapshotter.index.model import TocEntry

# Every TocEntry field, in the order a difference is reported (the name first: a different name
# at the same position usually means an added or dropped entry).
TOC_FIELDS = (
    "name",
    "type",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "size",
    "mtime_ns",
    "link_target",
    "devmajor",
    "devminor",
    "xattrs",
    "offset",
)
_SHOWN = 80  # characters of a value quoted in a difference


def first_difference(indexed: Sequence[TocEntry], parsed: Sequence[TocEntry]) -> str | None:
    """None when the two TOCs are identical; else one line naming the first differing entry
    (by position and name) and field, with both values (index vs tar)."""
    for position, (said, found) in enumerate(zip(indexed, parsed, strict=False)):
        if said == found:
            continue
        for name in TOC_FIELDS:
            said_value, found_value = getattr(said, name), getattr(found, name)
            if said_value != found_value:
                return (
                    f"entry {position} {found.name!r}: {name} is "
                    f"{_describe(name, said_value)} in the index, "
                    f"{_describe(name, found_value)} in the tar stream"
                )
        return f"entry {position} {found.name!r} differs"  # pragma: no cover - all fields seen
    if len(indexed) > len(parsed):
        extra = indexed[len(parsed)]
        return (
            f"the index has {len(indexed)} entries, the tar stream {len(parsed)}: "
            f"entry {len(parsed)} {extra.name!r} ({extra.type}) is not in the layer"
        )
    if len(parsed) > len(indexed):
        missing = parsed[len(indexed)]
        return (
            f"the index has {len(indexed)} entries, the tar stream {len(parsed)}: "
            f"entry {len(indexed)} {missing.name!r} ({missing.type}) is missing from the index"
        )
    return None


def _describe(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:#o}"
    if field == "xattrs" and isinstance(value, dict):
        shown = ", ".join(f"{key}={_short(repr(data))}" for key, data in sorted(value.items()))
        return "{" + shown + "}"
    return _short(repr(value) if isinstance(value, str) else str(value))


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


__all__ = ["TOC_FIELDS", "first_difference"]
