"""Incremental tar parser that turns an uncompressed layer stream into TOC entries.

Push-based (feed() bytes as they are inflated) because the builder's inflate loop is driven by the
gzip checkpoint library, not by the parser. File data is skipped, never buffered: memory stays at
one header plus PAX/GNU extension records (capped).
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import EntryType, TocEntry

BLOCK = 512
MAX_ENTRY_SIZE = 1 << 40  # 1 TiB: anything larger in a container layer is an attack or corruption
MAX_EXTENSION_SIZE = 1 << 20  # PAX / GNU long name records
# 262,144: real layers rarely pass ~100k entries (pybig's largest: ~12.8k); each entry costs
# a mount process ~1.7 KB for the life of the mount (docs/index-format.md "Limits").
MAX_ENTRIES = 1 << 18
# Replacing a directory with another entry scans the TOC once; real layers hardly ever do it.
MAX_REPLACED_DIRS = 256

_TYPES: dict[bytes, EntryType] = {
    b"0": EntryType.REG,
    b"\0": EntryType.REG,
    b"7": EntryType.REG,  # contiguous file: a regular file everywhere that matters
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"6": EntryType.FIFO,
}


def normalise_name(raw: str, what: str) -> str:
    """Relative, '/'-separated, no '.', '' or trailing parts; the root directory is ''.

    Raises InvalidLayer for absolute paths or '..' components (naming `what`)."""
    if "\0" in raw:
        raise InvalidLayer(f"tar entry {raw!r}: {what} contains a NUL byte")
    if raw.startswith("/"):
        raise InvalidLayer(f"tar entry {raw!r}: {what} is an absolute path")
    body = raw[:-1] if raw.endswith("/") else raw
    if body and "//" not in body and "/." not in body and body[0] != "." and body[-1] != "/":
        return body  # no empty, '.' or '..' part: already normal (most names; 1 us, not 3)
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidLayer(f"tar entry {raw!r}: {what} has a '..' component")
    return "/".join(parts)


def _parse_number(field_bytes: bytes, what: str, name: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for values that overflow octal
        value = int.from_bytes(field_bytes, "big", signed=False) & ~(
            0x80 << (8 * (len(field_bytes) - 1))
        )
        if field_bytes[0] & 0x40:  # negative base-256 number
            raise InvalidLayer(f"tar entry {name!r}: negative {what}")
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidLayer(f"tar entry {name!r}: {what} field {text!r} is not octal") from None


def _cstr(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, name: str) -> dict[str, bytes]:
    """PAX records 'LEN KEY=VALUE\\n'; values stay bytes (xattr values are binary)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise InvalidLayer(f"tar entry {name!r}: malformed PAX record at byte {pos}")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidLayer(f"tar entry {name!r}: malformed PAX record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise InvalidLayer(f"tar entry {name!r}: PAX record length {length} out of range")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise InvalidLayer(f"tar entry {name!r}: PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _pax_mtime_ns(value: bytes, name: str) -> int:
    text = value.decode("ascii", "replace")
    whole, _, frac = text.partition(".")
    try:
        seconds = int(whole)
        nanos = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        raise InvalidLayer(f"tar entry {name!r}: PAX mtime {text!r} is not a number") from None
    return seconds * 1_000_000_000 + (-nanos if text.startswith("-") else nanos)


_NO_PAX: dict[str, bytes] = {}  # shared, never written: most entries have no PAX records


@dataclass
class _Pending:
    """Extension records that apply to the next real entry."""

    pax: dict[str, bytes] = field(default_factory=dict)
    long_name: str | None = None
    long_link: str | None = None


@dataclass
class TarTocParser:
    """feed() uncompressed tar bytes in order, then finish() for the TOC entries."""

    # name -> entry in tar order (a dict: a duplicate is removed and re-added in O(1))
    _entries: dict[str, TocEntry] = field(default_factory=dict)
    _links_to: dict[str, int] = field(default_factory=dict)  # name -> hardlinks pointing at it
    _replaced_dirs: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0  # absolute offset of _buf[0] in the uncompressed stream
    _skip: int = 0  # bytes of entry data + padding still to skip
    _ext_kind: bytes = b""  # collecting data of a PAX/GNU extension entry
    _ext_size: int = 0
    _pending: _Pending = field(default_factory=_Pending)
    _global_pax: dict[str, bytes] = field(default_factory=dict)
    _ended: bool = False
    _current: str = ""  # last entry name, for truncation messages
    # When set: the stream offset of each regular file's data (size > 0), appended as soon as
    # its header is parsed, for a span builder that cuts spans at file starts (it drains it).
    data_starts: deque[int] | None = None

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._ended:
                return  # anything after the end-of-archive marker is ignored, as tar does
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                self._pos += step
                view = view[step:]
                continue
            if not self._buf and not self._ext_kind and len(view) >= BLOCK:
                self._header(bytes(view[:BLOCK]))  # a whole header at hand: no buffering
                self._pos += BLOCK
                view = view[BLOCK:]
                continue
            need = self._ext_size_padded() if self._ext_kind else BLOCK
            take = min(need - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == need:
                block = bytes(self._buf)
                self._buf.clear()
                if self._ext_kind:
                    self._finish_extension(block)
                else:
                    self._header(block)
                self._pos += need

    def finish(self) -> list[TocEntry]:
        """Validate the end of the stream and return the TOC (duplicates resolved)."""
        if self._skip or self._buf or self._ext_kind:
            raise InvalidLayer(
                f"tar entry {self._current!r} extends past the end of the layer stream"
            )
        return list(self._entries.values())

    def _ext_size_padded(self) -> int:
        return (self._ext_size + BLOCK - 1) // BLOCK * BLOCK

    def _header(self, block: bytes) -> None:
        header_offset = self._pos
        if block == bytes(BLOCK):
            self._ended = True
            return
        name_field = _cstr(block[0:100])
        self._check_checksum(block, name_field)
        size = _parse_number(block[124:136], "size", name_field)
        if size > MAX_ENTRY_SIZE:
            raise InvalidLayer(f"tar entry {name_field!r}: size {size} exceeds the 2^40 cap")
        typeflag = block[156:157]
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENSION_SIZE:
                raise InvalidLayer(
                    f"tar entry {name_field!r}: extension record of {size} bytes is too large"
                )
            self._ext_kind = typeflag
            self._ext_size = size
            self._current = name_field
            if size == 0:
                self._finish_extension(b"")
            return
        entry_type = _TYPES.get(typeflag)
        magic = block[257:263]
        prefix = _cstr(block[345:500]) if magic.startswith(b"ustar") else ""
        raw_name = f"{prefix}/{name_field}" if prefix else name_field
        pending = self._pending
        if pending.pax or pending.long_name is not None or pending.long_link is not None:
            self._pending = _Pending()
        pax = {**self._global_pax, **pending.pax} if self._global_pax or pending.pax else _NO_PAX
        if pending.long_name is not None:
            raw_name = pending.long_name
        if "path" in pax:
            raw_name = pax["path"].decode("utf-8", "surrogateescape")
        self._current = raw_name
        if entry_type is None:
            raise InvalidLayer(f"tar entry {raw_name!r}: unsupported tar type {typeflag!r}")
        if pax and any(key.startswith("GNU.sparse.") for key in pax):
            # PAX sparse (GNU 0.x/1.0): the entry's data is a packed map + data islands under a
            # placeholder name; serving it as a plain file would give wrong bytes. Pull whole.
            raise InvalidLayer(
                f"tar entry {raw_name!r}: GNU sparse file (PAX GNU.sparse.* records) is not "
                "supported for lazy reads"
            )
        raw_link = _cstr(block[157:257])
        if pending.long_link is not None:
            raw_link = pending.long_link
        if "linkpath" in pax:
            raw_link = pax["linkpath"].decode("utf-8", "surrogateescape")
        if "size" in pax:
            size = _parse_pax_int(pax["size"], "size", raw_name)
            if size > MAX_ENTRY_SIZE:
                raise InvalidLayer(f"tar entry {raw_name!r}: size {size} exceeds the 2^40 cap")
        name = normalise_name(raw_name, "name")
        if name == "" and entry_type is not EntryType.DIR:
            raise InvalidLayer(f"tar entry {raw_name!r}: the layer root must be a directory")
        mtime_ns = _parse_number(block[136:148], "mtime", raw_name) * 1_000_000_000
        if "mtime" in pax:
            mtime_ns = _pax_mtime_ns(pax["mtime"], raw_name)
        uid = _parse_number(block[108:116], "uid", raw_name)
        gid = _parse_number(block[116:124], "gid", raw_name)
        uid = _parse_pax_int(pax["uid"], "uid", raw_name) if "uid" in pax else uid
        gid = _parse_pax_int(pax["gid"], "gid", raw_name) if "gid" in pax else gid
        uname = _cstr(block[265:297])
        gname = _cstr(block[297:329])
        if "uname" in pax:
            uname = pax["uname"].decode("utf-8", "surrogateescape")
        if "gname" in pax:
            gname = pax["gname"].decode("utf-8", "surrogateescape")
        link_target = ""
        if entry_type is EntryType.SYMLINK:
            link_target = raw_link  # verbatim: resolved by the kernel inside the rootfs
        elif entry_type is EntryType.HARDLINK:
            link_target = self._resolve_hardlink(raw_name, raw_link)
        devmajor = devminor = 0
        if entry_type in (EntryType.CHAR, EntryType.BLOCK):
            devmajor = _parse_number(block[329:337], "devmajor", raw_name)
            devminor = _parse_number(block[337:345], "devminor", raw_name)
        data_offset = header_offset + BLOCK
        entry = TocEntry(
            name=name,
            type=entry_type,
            mode=_parse_number(block[100:108], "mode", raw_name) & 0o7777,
            uid=uid,
            gid=gid,
            uname=uname,
            gname=gname,
            size=size if entry_type is EntryType.REG else 0,
            mtime_ns=mtime_ns,
            link_target=link_target,
            devmajor=devmajor,
            devminor=devminor,
            xattrs=_xattrs(pax, raw_name) if pax else {},
            offset=data_offset if entry_type is EntryType.REG else 0,
        )
        # Only regular files carry data; like Go's archive/tar (containerd) and Python's
        # tarfile, the size field of other types is ignored.
        self._skip = (size + BLOCK - 1) // BLOCK * BLOCK if entry_type is EntryType.REG else 0
        if self.data_starts is not None and entry.size:
            self.data_starts.append(data_offset)
        self._add(entry)

    def _check_checksum(self, block: bytes, name: str) -> None:
        stored = _parse_number(block[148:156], "checksum", name)
        unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if stored == unsigned:
            return
        high = sum(1 for b in block[:148] + block[156:] if b >= 0x80)
        if stored != unsigned - 256 * high:  # some old tars summed signed chars
            raise InvalidLayer(
                f"tar header at {name!r} has a bad checksum (not a tar stream or corrupt)"
            )

    def _finish_extension(self, block: bytes) -> None:
        data = block[: self._ext_size]
        kind, self._ext_kind = self._ext_kind, b""
        if kind in (b"x", b"g"):
            records = _parse_pax(data, self._current)
            if kind == b"g":
                self._global_pax.update(records)
            else:
                self._pending.pax.update(records)
        else:
            text = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind == b"L":
                self._pending.long_name = text
            else:
                self._pending.long_link = text

    def _resolve_hardlink(self, raw_name: str, raw_link: str) -> str:
        target = normalise_name(raw_link, "hardlink target")
        existing = self._entries.get(target)
        if existing is None:
            raise InvalidLayer(
                f"tar entry {raw_name!r}: hardlink to {raw_link!r}, which is not an earlier entry"
            )
        if existing.type is EntryType.HARDLINK:
            return existing.link_target  # chains share one inode: point at the regular file
        if existing.type is not EntryType.REG:
            raise InvalidLayer(
                f"tar entry {raw_name!r}: hardlink to {raw_link!r}, a {existing.type} "
                "(only regular files can be hardlinked)"
            )
        return target

    def _add(self, entry: TocEntry) -> None:
        """Duplicates: the later entry wins, as when tar/containerd extract the layer. O(1) per
        entry (a crafted tar of 16k duplicates took 30 s when each one rebuilt the TOC),
        except replacing a directory, which scans the TOC for what lies under it: at most
        MAX_REPLACED_DIRS times per layer."""
        old = self._entries.get(entry.name)
        if old is None:
            if len(self._entries) >= MAX_ENTRIES:
                raise InvalidLayer(f"layer has more than {MAX_ENTRIES} tar entries")
            self._insert(entry)
            return
        if old.type is EntryType.DIR and entry.type is EntryType.DIR:
            # dir over dir: extraction keeps the directory and applies the new metadata
            self._entries[entry.name] = entry  # a dict keeps the key's position
            return
        if self._links_to.get(entry.name):
            other = next(
                e.name
                for e in self._entries.values()
                if e.type is EntryType.HARDLINK and e.link_target == entry.name
            )
            raise InvalidLayer(
                f"tar entry {entry.name!r} replaces an earlier entry that "
                f"{other!r} is hardlinked to"
            )
        removed = [entry.name]
        if old.type is EntryType.DIR:  # replacing a dir removes everything under it
            self._replaced_dirs += 1
            if self._replaced_dirs > MAX_REPLACED_DIRS:
                raise InvalidLayer(
                    f"tar entry {entry.name!r}: the layer replaces more than "
                    f"{MAX_REPLACED_DIRS} directories with other entries"
                )
            prefix = entry.name + "/" if entry.name else ""
            removed += [name for name in self._entries if name.startswith(prefix)]
        for name in removed:
            gone = self._entries.pop(name)
            if gone.type is EntryType.HARDLINK:
                self._links_to[gone.link_target] -= 1
        self._insert(entry)

    def _insert(self, entry: TocEntry) -> None:
        self._entries[entry.name] = entry
        if entry.type is EntryType.HARDLINK:
            self._links_to[entry.link_target] = self._links_to.get(entry.link_target, 0) + 1


def _parse_pax_int(value: bytes, what: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidLayer(f"tar entry {name!r}: PAX {what} {value!r} is not a number") from None
    if number < 0:
        raise InvalidLayer(f"tar entry {name!r}: negative PAX {what}")
    return number


def _xattrs(pax: dict[str, bytes], name: str) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[len("SCHILY.xattr.") :]] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            xname = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :]).decode(
                "utf-8", "surrogateescape"
            )
            try:
                xattrs[xname] = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise InvalidLayer(
                    f"tar entry {name!r}: xattr {xname!r} is not valid base64"
                ) from None
    return dict(sorted(xattrs.items()))


__all__ = ["MAX_ENTRIES", "MAX_ENTRY_SIZE", "TarTocParser", "normalise_name"]
