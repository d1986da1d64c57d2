"""LayerIndex <-> bytes (format versions 1 and 2, docs/index-format.md).

Layout: magic b"LZSNAPIX", u16 version, u16 flags (0), u64 payload length (all big-endian), then
one zstd frame holding the payload: u32 length of a JSON document, the JSON (sorted keys, no
whitespace, ASCII), then a blob section with span windows and xattr values that the JSON refers
to by (offset, length). JSON because C-speed parsing is what makes a 12k-entry index load fast in
Python; the bytes that would bloat it as base64 live in the blob section.

Version 2 moves the gzip windows (~94 % of a v1 index with 1 MiB spans) out into a windows blob:
one zstd frame per window, in span order, named by the JSON's `windows` key; the spans' window
offset/length point into it and the blob section keeps only xattr values. A mount then fetches
only the small index blob up front, and each window with its span (encode_index_split).

The index comes from a registry, so decode_index trusts nothing: every field is type-, range-
and cross-checked and any violation raises InvalidIndex naming the field.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import struct
from collections.abc import Callable
from typing import Any

import zstandard

from snapshotter.index.errors import InvalidIndex
from snapshotter.index.model import (
    FORMAT_VERSION,
    FORMAT_VERSION_EXTERNAL_WINDOWS,
    SUPPORTED_VERSIONS,
    Compression,
    EntryType,
    LayerIndex,
    Span,
    TocEntry,
    WindowsBlob,
)
from snapshotter.index.tar_toc import MAX_ENTRIES, MAX_ENTRY_SIZE

MAGIC = b"LZSNAPIX"
_HEADER = struct.Struct(">8sHHQ")
_JSON_LEN = struct.Struct(">I")
# Caps on what one index may make a reader build (docs/index-format.md "Limits" has the
# measured memory behind them). Decoding costs ~1.1 KB of Python objects per entry and the
# mount process keeps ~1.3 KB per entry, so the entry cap bounds a mount at ~350 MB; the
# payload, JSON and value caps bound what a crafted index costs before any entry is checked.
MAX_PAYLOAD = 256 << 20
# A real index inflates 2-9x (JSON of real layers, windows); 64x leaves room for very regular
# names while a 14 KB zstd bomb can no longer declare 160 MiB.
MAX_PAYLOAD_RATIO = 64
PAYLOAD_RATIO_SLACK = 1 << 20  # tiny indexes compress poorly or not at all: never refused
MAX_JSON = 64 << 20
# Upper bounds on JSON values (commas + opening brackets + 1) and strings (quotes / 2), checked
# before json.loads builds them: a value costs up to ~64 bytes of Python objects (an empty list,
# a new 2-character str), so a crafted JSON costs about what the largest real index does (~250
# MB, measured). A real entry is 16 values and 5 strings (+1 per xattr), a span 10 and 2.
MAX_JSON_VALUES = 20 * MAX_ENTRIES
MAX_JSON_STRINGS = 8 * MAX_ENTRIES
MAX_NAME_BYTES = 32 << 20  # all entry names together (UTF-8): the tree keeps them all
MAX_SPANS = 1 << 18
# What Linux can hold (and the copy of a layer to plain files can recreate): NAME_MAX bytes
# per name component, PATH_MAX - 1 bytes per name or symlink target; and a depth far beyond
# any image's (they stay under ~30) that still bounds the directory tree a mount builds.
NAME_MAX = 255
PATH_MAX = 4096
MAX_DEPTH = 512
MAX_SPAN_UNCOMPRESSED = 256 << 20  # a reader allocates this much per span
MAX_WINDOW = 32768
# A window's zstd frame: at most zstd's compress bound for 32 KiB (32944 bytes) plus slack.
MAX_WINDOW_FRAME = MAX_WINDOW + 1024
MAX_WINDOWS_BLOB = MAX_SPANS * MAX_WINDOW_FRAME
MAX_LAYER_SIZE = 1 << 46
_ZSTD_LEVEL = 10  # the index blob: a mount fetches it whole before serving
# A window frame: level 3 encodes a 32 KiB window in ~0.13 ms instead of level 10's ~0.6-0.8
# ms, for ~7 % more windows-blob bytes (docs/benchmarks.md "Span layouts"); with file-aware
# cuts the windows were most of the builder's time, and a reader fetches few of them.
_WINDOW_ZSTD_LEVEL = 3
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_MAX_INT = (1 << 63) - 1
_TYPES = {t.value: t for t in EntryType}
_COMPRESSIONS = {c.value: c for c in Compression}
_KEYS = {
    "compressed_size",
    "compression",
    "entries",
    "layer_digest",
    "layer_media_type",
    "prefetch",
    "span_size",
    "spans",
    "uncompressed_size",
}
_WINDOWS_KEYS = {"digest", "size"}


def encode_window(window: bytes) -> bytes:
    """One window as its independent zstd frame in a windows blob (b"" for no window)."""
    if not window:
        return b""
    return zstandard.ZstdCompressor(level=_WINDOW_ZSTD_LEVEL, write_checksum=True).compress(window)


def decode_window(frame: bytes) -> bytes:
    """A window frame fetched from a windows blob -> the window. InvalidIndex unless it is a
    zstd frame that declares and inflates to at most MAX_WINDOW bytes (the declared size bounds
    the output, so a crafted frame cannot inflate further); the checksum catches corruption."""
    if not 0 < len(frame) <= MAX_WINDOW_FRAME:
        raise _bad("window frame", f"{len(frame)} bytes is outside [1, {MAX_WINDOW_FRAME}]")
    try:
        declared = zstandard.frame_content_size(frame)
        if not 0 < declared <= MAX_WINDOW:
            raise _bad("window frame", f"declares {declared} bytes, not 1 to {MAX_WINDOW}")
        window = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise _bad("window frame", f"corrupt zstd frame: {exc}") from None
    if len(window) != declared:
        raise _bad("window frame", f"inflates to {len(window)} bytes, declares {declared}")
    return window


def encode_index_split(index: LayerIndex) -> tuple[bytes, bytes]:
    """(index blob, windows blob) for an index with inline windows: version 2, or version 1
    and an empty windows blob when no span has a window (zstd, uncompressed, one-span gzip).
    Deterministic, as encode_index."""
    if index.windows is not None:
        raise ValueError(f"layer {index.layer_digest}: the windows are already external")
    if not any(span.window for span in index.spans):
        return encode_index(index), b""
    frames = [encode_window(span.window) for span in index.spans]
    spans: list[Span] = []
    offset = 0
    for span, frame in zip(index.spans, frames, strict=True):
        spans.append(dataclasses.replace(span, window=b"", window_offset=offset,
                                         window_length=len(frame)))  # fmt: skip
        offset += len(frame)
    windows = b"".join(frames)
    external = dataclasses.replace(
        index,
        spans=tuple(spans),
        version=FORMAT_VERSION_EXTERNAL_WINDOWS,
        windows=WindowsBlob("sha256:" + hashlib.sha256(windows).hexdigest(), len(windows)),
    )
    return encode_index(external), windows


def encode_index(index: LayerIndex) -> bytes:
    """Deterministic: the same LayerIndex always gives the same bytes. Version 1 (windows
    inline) unless index.windows names a windows blob (a decoded version-2 index): version 2."""
    external = index.windows is not None
    if any(s.window if external else s.window_offset or s.window_length for s in index.spans):
        raise ValueError(
            f"layer {index.layer_digest}: spans must carry inline windows only without a "
            "windows blob, and window offsets only with one"
        )
    blob = bytearray()

    def put(data: bytes) -> list[int]:
        ref = [len(blob), len(data)]
        blob.extend(data)
        return ref

    spans = [
        [
            s.compressed_start,
            s.compressed_end,
            s.uncompressed_start,
            s.uncompressed_end,
            s.digest,
            s.uncompressed_digest,
            s.bits,
            *([s.window_offset, s.window_length] if external else put(s.window)),
        ]
        for s in index.spans
    ]
    entries = [
        [
            e.name,
            e.type.value,
            e.mode,
            e.uid,
            e.gid,
            e.uname,
            e.gname,
            e.size,
            e.mtime_ns,
            e.link_target,
            e.devmajor,
            e.devminor,
            e.offset,
            [[key, *put(value)] for key, value in sorted(e.xattrs.items())],
        ]
        for e in index.entries
    ]
    document: dict[str, Any] = {
        "compressed_size": index.compressed_size,
        "compression": index.compression.value,
        "entries": entries,
        "layer_digest": index.layer_digest,
        "layer_media_type": index.layer_media_type,
        "prefetch": list(index.prefetch),
        "span_size": index.span_size,
        "spans": spans,
        "uncompressed_size": index.uncompressed_size,
    }
    version = FORMAT_VERSION
    if index.windows is not None:
        document["windows"] = {"digest": index.windows.digest, "size": index.windows.size}
        version = FORMAT_VERSION_EXTERNAL_WINDOWS
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    payload = _JSON_LEN.pack(len(text)) + text.encode("ascii") + bytes(blob)
    compressed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(payload)
    return _HEADER.pack(MAGIC, version, 0, len(payload)) + compressed


def _bad(field: str, why: str) -> InvalidIndex:
    return InvalidIndex(f"invalid layer index: {field}: {why}")


def _int(value: Any, field: str, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(field, f"expected an integer in [{low}, {high}], got {value!r:.80}")
    return value


def _str(value: Any, field: str) -> str:
    if type(value) is not str or "\0" in value or len(value) > 65536:
        raise _bad(field, f"expected a string without NUL, got {value!r:.80}")
    return value


def _digest(value: Any, field: str) -> str:
    if type(value) is not str or not _DIGEST.match(value):
        raise _bad(field, f"expected sha256:<64 hex>, got {value!r:.80}")
    return value


def _safe_name(value: Any, field: str) -> str:
    name = _str(value, field)
    # '' is the layer root; otherwise no empty, '.' or '..' parts (so no leading/trailing '/')
    if name and any(part in ("", ".", "..") for part in name.split("/")):
        raise _bad(field, f"name {name!r} is not normalised or escapes the layer")
    return name


def _blob_ref(blob: memoryview, offset: Any, length: Any, field: str, limit: int) -> bytes:
    off = _int(offset, field + " offset", 0, len(blob))
    size = _int(length, field + " length", 0, min(limit, len(blob) - off))
    return bytes(blob[off : off + size])


def _read_payload(data: bytes) -> tuple[int, bytes, memoryview]:
    """(version, JSON text, blob section) of index bytes, after the header's checks."""
    if len(data) < _HEADER.size:
        raise _bad("header", f"{len(data)} bytes is too short for a lazysnap index")
    magic, version, flags, payload_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _bad("magic", f"{magic!r} is not a lazysnap index")
    if version not in SUPPORTED_VERSIONS:
        supported = " and ".join(map(str, SUPPORTED_VERSIONS))
        raise _bad("version", f"format version {version} is not supported (only {supported})")
    if flags != 0:
        raise _bad("flags", f"unknown flags {flags:#x}")
    if payload_len > MAX_PAYLOAD:
        raise _bad("payload length", f"{payload_len} exceeds the {MAX_PAYLOAD} byte cap")
    ratio_cap = MAX_PAYLOAD_RATIO * len(data) + PAYLOAD_RATIO_SLACK
    if payload_len > ratio_cap:
        raise _bad(
            "payload length",
            f"{payload_len} bytes from a {len(data)} byte blob: more than {MAX_PAYLOAD_RATIO}x "
            f"the blob + {PAYLOAD_RATIO_SLACK} (a compression bomb?)",
        )
    if payload_len < _JSON_LEN.size:
        raise _bad("payload", "too short")
    return version, *_inflate_payload(memoryview(data)[_HEADER.size :], payload_len)


def _inflate_payload(frame: memoryview, payload_len: int) -> tuple[bytes, memoryview]:
    """(JSON text, blob section), inflating at most payload_len bytes whatever the frame says.

    zstandard's one-shot decompress allocates what the frame declares and ignores
    max_output_size then, so a declared size must equal payload_len (already capped); an
    undeclared one is bounded by max_output_size. The JSON length is read first, from a
    4-byte streaming read, so an oversized JSON is refused before anything is inflated."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared >= 0 and declared != payload_len:  # -1: not declared
            raise _bad("payload", f"zstd frame declares {declared} bytes, header {payload_len}")
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as r:
            head = r.read(_JSON_LEN.size)
        if len(head) < _JSON_LEN.size:
            raise _bad("payload", "too short")
        (json_len,) = _JSON_LEN.unpack(head)
        if json_len > payload_len - _JSON_LEN.size:
            raise _bad("payload", f"JSON length {json_len} exceeds the payload")
        if json_len > MAX_JSON:
            raise _bad("payload", f"JSON of {json_len} bytes exceeds the {MAX_JSON} byte cap")
        payload = zstandard.ZstdDecompressor().decompress(frame, max_output_size=payload_len)
    except zstandard.ZstdError as exc:
        raise _bad("payload", f"zstd frame is corrupt or truncated: {exc}") from None
    if len(payload) != payload_len:
        raise _bad("payload", f"inflates to {len(payload)} bytes, header says {payload_len}")
    end = _JSON_LEN.size + json_len
    return payload[_JSON_LEN.size : end], memoryview(payload)[end:]


def _check_json_shape(text: bytes) -> None:
    """Bound what json.loads may build before it builds anything: an upper bound on its
    values (each value but the first in a container follows a comma; a bracket or comma
    inside a string only overcounts)."""
    values = text.count(b",") + text.count(b"[") + text.count(b"{") + 1
    if values > MAX_JSON_VALUES:
        raise _bad("payload", f"JSON holds up to {values} values, more than {MAX_JSON_VALUES}")
    strings = text.count(b'"') // 2  # an escaped quote inside a string only overcounts
    if strings > MAX_JSON_STRINGS:
        raise _bad("payload", f"JSON holds up to {strings} strings, more than {MAX_JSON_STRINGS}")


def _windows(raw: Any) -> WindowsBlob:
    if type(raw) is not dict or set(raw) != _WINDOWS_KEYS:
        keys = sorted(raw) if type(raw) is dict else type(raw).__name__
        raise _bad("windows", f"expected keys {sorted(_WINDOWS_KEYS)}, got {keys}")
    return WindowsBlob(
        _digest(raw["digest"], "windows.digest"),
        _int(raw["size"], "windows.size", 0, MAX_WINDOWS_BLOB),
    )


def _spans(
    raw: Any,
    blob: memoryview,
    compression: Compression,
    csize: int,
    usize: int,
    windows: WindowsBlob | None,
) -> tuple[Span, ...]:
    if type(raw) is not list or len(raw) > MAX_SPANS:
        raise _bad("spans", f"expected a list of at most {MAX_SPANS} spans")
    spans: list[Span] = []
    cpos = upos = 0
    wpos = 0  # version 2: the windows blob is the spans' frames back to back, in span order
    for i, item in enumerate(raw):
        where = f"spans[{i}]"
        if type(item) is not list or len(item) != 9:
            raise _bad(where, "expected 9 fields")
        cstart, cend, ustart, uend, digest, udigest, bits, woff, wlen = item
        bits = _int(bits, where + ".bits", 0, 7 if compression is Compression.GZIP else 0)
        if i == 0 and bits:
            raise _bad(where + ".bits", "the first span starts at the blob start")
        expected_cstart = cpos - (1 if bits else 0)
        _int(cstart, where + ".compressed_start", expected_cstart, expected_cstart)
        _int(cend, where + ".compressed_end", max(cstart + 1, cpos), csize)
        _int(ustart, where + ".uncompressed_start", upos, upos)
        _int(uend, where + ".uncompressed_end", upos, min(usize, upos + MAX_SPAN_UNCOMPRESSED))
        if windows is None:
            window = _blob_ref(blob, woff, wlen, where + ".window", MAX_WINDOW)
            woff = wlen = 0
        else:
            window = b""
            _int(woff, where + ".window_offset", wpos, wpos)
            _int(wlen, where + ".window_length", 0, min(MAX_WINDOW_FRAME, windows.size - wpos))
            wpos += wlen
        if (window or wlen) and compression is not Compression.GZIP:
            raise _bad(where + ".window", f"{compression} spans carry no window")
        if bits and not (window or wlen):
            raise _bad(where + ".window", "a mid-byte checkpoint needs its window")
        span = Span(cstart, cend, ustart, uend, _digest(digest, where + ".digest"),
                    _digest(udigest, where + ".uncompressed_digest"), bits, window,
                    woff, wlen)  # fmt: skip
        if compression is Compression.NONE and (
            cstart != ustart or cend != uend or digest != udigest
        ):
            raise _bad(where, "uncompressed layer spans must map bytes 1:1")
        spans.append(span)
        cpos, upos = cend, uend
    if cpos != csize or upos != usize:
        raise _bad(
            "spans",
            f"cover compressed [0, {cpos}) and uncompressed [0, {upos}), "
            f"layer is {csize} / {usize} bytes",
        )
    if windows is not None and wpos != windows.size:
        raise _bad("windows.size", f"{windows.size}, but the spans' windows end at {wpos}")
    return tuple(spans)


def _entry_error(
    item: list[Any],
    i: int,
    blob: memoryview,
    usize: int,
    seen: dict[str, EntryType],
    data_end: int,
) -> InvalidIndex:
    """Slow path: find and name what is wrong with an entry the fast path rejected."""
    name = _safe_name(item[0], f"entries[{i}].name")
    where = f"entry {name!r}"
    if name in seen:
        return _bad(where, "duplicate name")
    kind = _TYPES.get(item[1]) if type(item[1]) is str else None
    if kind is None:
        return _bad(where + ".type", f"unknown type {item[1]!r:.40}")
    if name == "" and kind is not EntryType.DIR:
        return _bad(where, "the layer root must be a directory")
    _int(item[2], where + ".mode", 0, 0o7777)
    _int(item[3], where + ".uid")
    _int(item[4], where + ".gid")
    _str(item[5], where + ".uname")
    _str(item[6], where + ".gname")
    size = _int(item[7], where + ".size", 0, MAX_ENTRY_SIZE if kind is EntryType.REG else 0)
    _int(item[8], where + ".mtime_ns", -_MAX_INT, _MAX_INT)
    link = _str(item[9], where + ".link_target")
    if kind is EntryType.HARDLINK:
        if seen.get(_safe_name(link, where + ".link_target")) is not EntryType.REG:
            return _bad(where + ".link_target", f"{link!r} is not an earlier regular file")
    elif kind is not EntryType.SYMLINK and link:
        return _bad(where + ".link_target", f"a {kind} has no link target")
    _int(item[10], where + ".devmajor", 0, _MAX_DEV)
    _int(item[11], where + ".devminor", 0, _MAX_DEV)
    offset = _int(item[12], where + ".offset", 0, usize - size if kind is EntryType.REG else 0)
    if kind is EntryType.REG and offset < data_end:
        return _bad(
            where + ".offset",
            f"data at {offset} overlaps the previous file's, which ends at {data_end} "
            "(file data must follow each other in tar order)",
        )
    refs = item[13]
    if type(refs) is not list:
        return _bad(where + ".xattrs", "expected a list")
    keys: set[str] = set()
    for ref in refs:
        if type(ref) is not list or len(ref) != 3:
            return _bad(where + ".xattrs", "expected [name, offset, length]")
        key = _str(ref[0], where + ".xattrs name")
        if not key or key in keys:
            return _bad(where + ".xattrs", f"empty or duplicate xattr name {key!r}")
        keys.add(key)
        _blob_ref(blob, ref[1], ref[2], f"{where}.xattrs[{key!r}]", _MAX_XATTR)
    return _bad(where, "invalid")


_MAX_DEV = (1 << 32) - 1
_MAX_XATTR = 1 << 20
# a '', '.' or '..' path component, or a NUL: never in a normalised name
_BAD_NAME = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|\x00")


def _names_look_safe(raw: list[Any]) -> bool:
    """All names checked at once instead of one regex call per entry. Joined by "/" and framed
    by "/", the names' parts follow each other between single slashes, so an empty, '.' or
    '..' part in any name shows up as "//", "/./" or "/../" (plain substring searches: ~1 ms
    for 13k names, where one regex pass over the joined names took 15-45 ms). False means
    "check each name", as does a newline in a name (the per-entry regex has its own view of
    those). The root ('') is left to the per-entry check."""
    names = [item[0] for item in raw if type(item) is list and item and type(item[0]) is str]
    if len(names) != len(raw):
        return False
    named = [name for name in names if name]
    if not named:
        return True
    joined = "/" + "/".join(named) + "/"
    return not any(bad in joined for bad in ("//", "/./", "/../", "\0", "\n"))


def name_limits_problem(name: str, link_target: str, symlink: bool) -> str | None:
    """Why Linux (and the copy of a layer to plain files) cannot hold this entry, or None:
    more than NAME_MAX bytes in a component, PATH_MAX - 1 bytes or MAX_DEPTH components in
    the name, a symlink target over PATH_MAX - 1 bytes, or text that is no file name (a lone
    surrogate that no undecodable tar byte gives). UTF-8 bytes, as the kernel counts."""
    try:
        encoded = name.encode("utf-8", "surrogateescape")
        target = link_target.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "name or link target has a lone surrogate: not a file name"
    if len(encoded) > PATH_MAX - 1:
        return f"name is {len(encoded)} bytes, more than PATH_MAX - 1 = {PATH_MAX - 1}"
    parts = encoded.split(b"/")
    if len(parts) > MAX_DEPTH:
        return f"name is {len(parts)} components deep, more than {MAX_DEPTH}"
    longest = max(parts, key=len)
    if len(longest) > NAME_MAX:
        return (
            f"component {longest[:40]!r}... is {len(longest)} bytes, more than NAME_MAX = "
            f"{NAME_MAX}"
        )
    if symlink and len(target) > PATH_MAX - 1:
        return f"link target is {len(target)} bytes, more than PATH_MAX - 1 = {PATH_MAX - 1}"
    return None


def _check_name_limits(raw: list[Any]) -> None:
    """name_limits_problem of every entry, and all names together at most MAX_NAME_BYTES (the
    mount keeps them all). Fast path: an ASCII name of at most 63 characters with an ASCII
    link target of at most 63 is within every limit (~4 ms for 13k entries)."""
    total = 0
    for item in raw:
        if type(item) is not list or len(item) != 14:
            continue  # the entry check names what is wrong with it
        name, link = item[0], item[9]
        if type(name) is not str or type(link) is not str:
            continue
        if len(name) <= 63 and len(link) <= 63 and name.isascii() and link.isascii():
            total += len(name)
            continue
        why = name_limits_problem(name, link, item[1] == "symlink")
        if why is not None:
            raise _bad(f"entry {name[:80]!r}{'...' if len(name) > 80 else ''}", why)
        total += len(name.encode("utf-8", "surrogateescape"))
    if total > MAX_NAME_BYTES:
        raise _bad("entries", f"names total {total} bytes, more than {MAX_NAME_BYTES}")


_REG, _HARDLINK, _SYMLINK, _DIR = (
    EntryType.REG,
    EntryType.HARDLINK,
    EntryType.SYMLINK,
    EntryType.DIR,
)


def _never(_name: str) -> bool:
    return False


def _entries(raw: Any, blob: memoryview, usize: int) -> tuple[TocEntry, ...]:
    """Fast path: one flat check per entry (12k entries must load in a few ms); on failure
    _entry_error re-checks field by field to name the problem."""
    if type(raw) is not list or len(raw) > MAX_ENTRIES:
        raise _bad("entries", f"expected a list of at most {MAX_ENTRIES} entries")
    _check_name_limits(raw)
    entries: list[TocEntry] = []
    seen: dict[str, EntryType] = {}
    bad_name: Callable[[str], object] = _BAD_NAME.search
    if raw and _names_look_safe(raw):
        bad_name = _never  # all names already checked in one pass
    new = object.__new__
    setattr_ = object.__setattr__
    blob_len = len(blob)
    owners: dict[str, str] = {}
    # Regular files' data lie in tar order, one after another: a range overlapping the one
    # before (a crafted index) would make the copy to plain files write the same bytes again
    # and again, for as many entries as point at them. (An empty file reads no bytes: its
    # offset only has to keep the order.)
    data_end = 0
    for i, item in enumerate(raw):
        if type(item) is not list or len(item) != 14:
            raise _bad(f"entries[{i}]", "expected 14 fields")
        (
            name,
            kind_s,
            mode,
            uid,
            gid,
            uname,
            gname,
            size,
            mtime,
            link,
            major,
            minor,
            offset,
            refs,
        ) = item
        kind = _TYPES.get(kind_s) if type(kind_s) is str else None
        ok = (
            kind is not None
            and type(name) is str
            and ((name == "" and kind is _DIR) or (name != "" and not bad_name(name)))
            and name not in seen
            and type(mode) is int and 0 <= mode <= 0o7777
            and type(uid) is int and 0 <= uid <= _MAX_INT
            and type(gid) is int and 0 <= gid <= _MAX_INT
            and type(uname) is str and type(gname) is str
            and "\0" not in uname and "\0" not in gname
            and type(size) is int and type(offset) is int and type(mtime) is int
            and -_MAX_INT <= mtime <= _MAX_INT
            and type(link) is str and "\0" not in link
            and type(major) is int and type(minor) is int
            and 0 <= major <= _MAX_DEV and 0 <= minor <= _MAX_DEV
            and type(refs) is list
        )  # fmt: skip
        if ok:
            if kind is _REG:
                ok = 0 <= size <= MAX_ENTRY_SIZE and data_end <= offset <= usize - size
            else:
                ok = size == 0 and offset == 0
                if kind is _HARDLINK:
                    ok = ok and seen.get(link) is _REG
                elif kind is not _SYMLINK:
                    ok = ok and link == ""
        xattrs: dict[str, bytes] = {}
        if ok and refs:
            for ref in refs:
                if not (
                    type(ref) is list and len(ref) == 3
                    and type(ref[0]) is str and ref[0] and "\0" not in ref[0]
                    and ref[0] not in xattrs
                    and type(ref[1]) is int and type(ref[2]) is int
                    and 0 <= ref[1] <= blob_len
                    and 0 <= ref[2] <= min(_MAX_XATTR, blob_len - ref[1])
                ):  # fmt: skip
                    ok = False
                    break
                xattrs[ref[0]] = bytes(blob[ref[1] : ref[1] + ref[2]])
        if not ok:
            raise _entry_error(item, i, blob, usize, seen, data_end)
        if kind is _REG:
            data_end = offset + size
        # frozen-dataclass construction goes through object.__setattr__ per field: filling
        # __dict__ directly is ~3x faster for the same validated values
        entry = new(TocEntry)
        # json.loads makes a new str per occurrence: share the few owner names (~100 bytes
        # per entry for as long as the index lives)
        uname = owners.setdefault(uname, uname)
        gname = owners.setdefault(gname, gname)
        setattr_(entry, "__dict__", {
            "name": name, "type": kind, "mode": mode, "uid": uid, "gid": gid, "uname": uname,
            "gname": gname, "size": size, "mtime_ns": mtime, "link_target": link,
            "devmajor": major, "devminor": minor, "xattrs": xattrs, "offset": offset,
        })  # fmt: skip
        entries.append(entry)
        raw[i] = None  # its parsed list is garbage now: the next entries reuse the memory
        seen[name] = kind  # type: ignore[assignment]  # ok implies kind is not None
    return tuple(entries)


def decode_index(data: bytes, *, expected_layer_digest: str | None = None) -> LayerIndex:
    """Parse and fully validate index bytes; InvalidIndex on anything malformed or unexpected."""
    # Creating ~100k containers triggers full GC passes that cost more than the decoding; they
    # would find no garbage here (nothing is cyclic), so pause the collector meanwhile.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode(data, expected_layer_digest)
    finally:
        if was_enabled:
            gc.enable()


def _decode(data: bytes, expected_layer_digest: str | None) -> LayerIndex:
    version, text, blob_section = _read_payload(data)
    _check_json_shape(text)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad("payload", f"JSON is malformed: {exc}") from None
    del text  # the objects are built: the text no longer counts towards the peak
    expected_keys = _KEYS if version == FORMAT_VERSION else _KEYS | {"windows"}
    if type(document) is not dict or set(document) != expected_keys:
        keys = sorted(document) if type(document) is dict else type(document).__name__
        raise _bad("document", f"expected keys {sorted(expected_keys)}, got {keys}")
    windows = _windows(document["windows"]) if version == FORMAT_VERSION_EXTERNAL_WINDOWS else None
    blob = blob_section
    layer_digest = _digest(document["layer_digest"], "layer_digest")
    if expected_layer_digest is not None and layer_digest != expected_layer_digest:
        raise _bad("layer_digest", f"index is for {layer_digest}, expected {expected_layer_digest}")
    compression = (
        _COMPRESSIONS.get(document["compression"]) if type(document["compression"]) is str else None
    )
    if compression is None:
        raise _bad("compression", f"unknown value {document['compression']!r:.40}")
    csize = _int(document["compressed_size"], "compressed_size", 0, MAX_LAYER_SIZE)
    usize = _int(document["uncompressed_size"], "uncompressed_size", 0, MAX_LAYER_SIZE)
    spans = _spans(document["spans"], blob, compression, csize, usize, windows)
    entries = _entries(document["entries"], blob, usize)
    prefetch_raw = document["prefetch"]
    names = {e.name for e in entries}
    if type(prefetch_raw) is not list or any(
        type(n) is not str or n not in names for n in prefetch_raw
    ):
        raise _bad("prefetch", "expected a list of entry names")
    return LayerIndex(
        layer_digest=layer_digest,
        layer_media_type=_str(document["layer_media_type"], "layer_media_type"),
        compression=compression,
        compressed_size=csize,
        uncompressed_size=usize,
        span_size=_int(document["span_size"], "span_size", 1, 1 << 30),
        entries=entries,
        spans=spans,
        prefetch=tuple(prefetch_raw),
        version=version,
        windows=windows,
    )
