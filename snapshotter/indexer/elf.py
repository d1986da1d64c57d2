"""What the dynamic loader needs to start an ELF executable: its PT_INTERP (the loader itself)
and its dynamic section's DT_NEEDED names, DT_RPATH and DT_RUNPATH.

No I/O: the caller passes `read(offset, length) -> bytes` (at most `length` bytes, fewer at the
end of the file), backed by the layer bytes the index builder fetches through the layer's
index. Every offset, count and length comes from the file, so every one is checked against the
file size and against small caps before anything is read: hostile or truncated input raises
ElfError naming what is wrong, and never makes the caller read more than a few hundred KiB.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_RPATH = 15
DT_RUNPATH = 29

MAX_PROGRAM_HEADERS = 512  # real executables have ~15
MAX_DYNAMIC_BYTES = 64 << 10  # ~40 entries in practice (16 bytes each on 64-bit)
MAX_STRTAB_BYTES = 1 << 20  # only the names the dynamic section points at are decoded
MAX_INTERP_BYTES = 4096  # PATH_MAX
MAX_NAME_BYTES = 4096
MAX_NEEDED = 256

ReadAt = Callable[[int, int], bytes]


class ElfError(ValueError):
    """Not an ELF file we can read, or a malformed one; the message says what is wrong."""


@dataclass(frozen=True)
class ElfDependencies:
    interpreter: str | None  # PT_INTERP, e.g. "/lib64/ld-linux-x86-64.so.2"; None: static
    needed: tuple[str, ...]  # DT_NEEDED, in the order the loader loads them
    rpath: tuple[str, ...] = ()  # DT_RPATH (":"-split), searched first unless there is a RUNPATH
    runpath: tuple[str, ...] = ()  # DT_RUNPATH, searched after LD_LIBRARY_PATH


@dataclass(frozen=True)
class _Segment:
    kind: int
    offset: int
    vaddr: int
    filesz: int


def is_elf(head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


def elf_dependencies(read: ReadAt, size: int, where: str = "ELF file") -> ElfDependencies:
    """The loader-relevant facts of the ELF file of `size` bytes behind `read`. ElfError when
    it is not ELF, or when a header, segment or string lies outside the file or the caps."""
    header = _read_exact(read, size, 0, 64, where, "ELF header")
    if not header.startswith(ELF_MAGIC):
        raise ElfError(f"{where}: not an ELF file (no \\x7fELF magic)")
    elf_class, data = header[4], header[5]
    if elf_class not in (1, 2):
        raise ElfError(f"{where}: unknown ELF class {elf_class}")
    if data not in (1, 2):
        raise ElfError(f"{where}: unknown ELF data encoding {data}")
    is64 = elf_class == 2
    end = "<" if data == 1 else ">"
    if is64:
        (phoff,) = _unpack(end + "Q", header, 32)
        phentsize, phnum = _unpack(end + "HH", header, 54)
    else:
        (phoff,) = _unpack(end + "I", header, 28)
        phentsize, phnum = _unpack(end + "HH", header, 42)
    segments = _program_headers(read, size, is64, end, phoff, phentsize, phnum, where)
    interpreter = None
    for segment in segments:
        if segment.kind == PT_INTERP:
            interpreter = _interp(read, size, segment, where)
            break
    dynamic = next((s for s in segments if s.kind == PT_DYNAMIC), None)
    if dynamic is None:
        return ElfDependencies(interpreter, ())
    return _dynamic(read, size, is64, end, dynamic, segments, interpreter, where)


def _unpack(fmt: str, data: bytes, offset: int) -> tuple[int, ...]:
    return struct.unpack_from(fmt, data, offset)


def _read_exact(read: ReadAt, size: int, offset: int, length: int, where: str, what: str) -> bytes:
    if offset < 0 or length < 0 or offset + length > size:
        raise ElfError(
            f"{where}: {what} at offset {offset} (+{length} bytes) lies outside the file "
            f"({size} bytes)"
        )
    data = read(offset, length)
    if len(data) != length:
        raise ElfError(f"{where}: {what}: read {len(data)} of {length} bytes (truncated file)")
    return data


def _program_headers(
    read: ReadAt,
    size: int,
    is64: bool,
    end: str,
    phoff: int,
    phentsize: int,
    phnum: int,
    where: str,
) -> list[_Segment]:
    minimum = 56 if is64 else 32
    if phnum == 0:
        return []
    if phnum > MAX_PROGRAM_HEADERS:
        raise ElfError(f"{where}: {phnum} program headers, more than {MAX_PROGRAM_HEADERS}")
    if phentsize < minimum:
        raise ElfError(f"{where}: program header size {phentsize} < {minimum}")
    table = _read_exact(read, size, phoff, phentsize * phnum, where, "program header table")
    segments = []
    for number in range(phnum):
        base = number * phentsize
        if is64:
            kind, _flags, offset, vaddr, _paddr, filesz = _unpack(end + "IIQQQQ", table, base)
        else:
            kind, offset, vaddr, _paddr, filesz = _unpack(end + "IIIII", table, base)
        segments.append(_Segment(kind, offset, vaddr, filesz))
    return segments


def _interp(read: ReadAt, size: int, segment: _Segment, where: str) -> str:
    if not 0 < segment.filesz <= MAX_INTERP_BYTES:
        raise ElfError(f"{where}: PT_INTERP of {segment.filesz} bytes (1 to {MAX_INTERP_BYTES})")
    raw = _read_exact(read, size, segment.offset, segment.filesz, where, "PT_INTERP")
    return _decode_name(raw.split(b"\0", 1)[0], where, "PT_INTERP")


def _decode_name(raw: bytes, where: str, what: str) -> str:
    if not raw:
        raise ElfError(f"{where}: empty {what}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ElfError(f"{where}: {what} is not UTF-8: {raw[:64]!r}") from None


def _dynamic(
    read: ReadAt,
    size: int,
    is64: bool,
    end: str,
    dynamic: _Segment,
    segments: list[_Segment],
    interpreter: str | None,
    where: str,
) -> ElfDependencies:
    if dynamic.filesz > MAX_DYNAMIC_BYTES:
        raise ElfError(f"{where}: dynamic section of {dynamic.filesz} bytes > {MAX_DYNAMIC_BYTES}")
    table = _read_exact(read, size, dynamic.offset, dynamic.filesz, where, "dynamic section")
    entry_format = end + ("qQ" if is64 else "iI")
    entry_size = struct.calcsize(entry_format)
    needed: list[int] = []
    rpath: list[int] = []
    runpath: list[int] = []
    strtab: int | None = None
    strsz: int | None = None
    for base in range(0, len(table) - entry_size + 1, entry_size):
        tag, value = _unpack(entry_format, table, base)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            if len(needed) >= MAX_NEEDED:
                raise ElfError(f"{where}: more than {MAX_NEEDED} DT_NEEDED entries")
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab = value
        elif tag == DT_STRSZ:
            strsz = value
        elif tag == DT_RPATH:
            rpath.append(value)
        elif tag == DT_RUNPATH:
            runpath.append(value)
    if not (needed or rpath or runpath):
        return ElfDependencies(interpreter, ())
    if strtab is None or strsz is None:
        raise ElfError(f"{where}: dynamic section names libraries but has no DT_STRTAB/DT_STRSZ")
    strings = _string_table(read, size, strtab, strsz, segments, where)

    def name(offset: int) -> str:
        if offset >= len(strings):
            raise ElfError(f"{where}: string offset {offset} outside DT_STRTAB ({len(strings)})")
        raw = strings[offset : offset + MAX_NAME_BYTES]
        if b"\0" not in raw:
            raise ElfError(f"{where}: unterminated string at DT_STRTAB offset {offset}")
        return _decode_name(raw.split(b"\0", 1)[0], where, "DT_NEEDED/RPATH string")

    def paths(offsets: list[int]) -> tuple[str, ...]:
        return tuple(part for offset in offsets for part in name(offset).split(":") if part)

    return ElfDependencies(
        interpreter, tuple(name(offset) for offset in needed), paths(rpath), paths(runpath)
    )


def _string_table(
    read: ReadAt, size: int, vaddr: int, strsz: int, segments: list[_Segment], where: str
) -> bytes:
    """DT_STRTAB is an address: map it to a file offset through the PT_LOAD holding it."""
    length = min(strsz, MAX_STRTAB_BYTES)
    for segment in segments:
        if segment.kind == PT_LOAD and segment.vaddr <= vaddr < segment.vaddr + segment.filesz:
            offset = segment.offset + (vaddr - segment.vaddr)
            length = min(length, segment.vaddr + segment.filesz - vaddr)
            return _read_exact(read, size, offset, length, where, "DT_STRTAB")
    raise ElfError(f"{where}: DT_STRTAB address {vaddr:#x} is in no loaded segment")
