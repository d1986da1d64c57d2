"""Streaming gzip inflate that can stop at deflate block boundaries (zlib's Z_BLOCK), via ctypes.

Python's zlib bindings (and zlib_ng's) cannot stop at a block boundary or report the bit offset
there, which is what a zran checkpoint needs. Calling the C library's inflate() directly gives
both in one inflate pass, and ctypes releases the GIL for the call, so several layers build in
parallel threads.

Libraries, fastest first:
* zlib-ng as linked into the zlib_ng wheel, which exports its native `zng_*` API (~2.5x faster
  than zlib on this machine);
* the system's libz.so.1 (always present: CPython's zlib module links it).
Each is checked on load against a known stream (struct layout, data_type, total counters), so a
wheel that stops exporting the symbols or changes its ABI is skipped rather than trusted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

Z_OK = 0
Z_STREAM_END = 1
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5
GZIP_ONLY = 31  # windowBits: 32 KiB window, gzip wrapper only (zlib and raw streams refused)

_AT_BOUNDARY = 128  # data_type: inflate stopped at a block boundary (or right after a header)
_LAST_BLOCK = 64  # data_type: the block just decoded was the member's last one
_BIT_COUNT = 63  # data_type: unused bits in inflate's bit buffer


class InflateError(Exception):
    """The compressed data is invalid; the message is zlib's."""


class _ZngStream(ctypes.Structure):
    """zlib-ng's native zng_stream (zlib-ng.h)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint32),
        ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint32),
        ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_uint32),
        ("reserved", ctypes.c_ulong),
        # slack: a library whose struct grew writes here, not past our allocation, until the
        # self-test refuses it (zlib-ng's native API has no struct size check)
        ("_guard", ctypes.c_char * 64),
    ]


class _ZStream(ctypes.Structure):
    """zlib's z_stream (zlib.h)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
        ("_guard", ctypes.c_char * 64),  # as in _ZngStream (zlib checks the size it is told)
    ]


@dataclass(frozen=True)
class InflateLibrary:
    """One C inflate implementation, bound through ctypes."""

    name: str  # "zlib-ng <version>" or "zlib <version>"
    stream_type: type[_ZngStream] | type[_ZStream]
    # each takes a ctypes pointer to a stream_type instance and returns zlib's status code
    init: Callable[..., int]  # (stream, windowBits)
    inflate: Callable[..., int]  # (stream, flush)
    reset: Callable[..., int]
    end: Callable[..., int]


def _bind_zlib_ng() -> InflateLibrary:
    from zlib_ng import zlib_ng

    lib = ctypes.CDLL(zlib_ng.__file__)  # already loaded by the import: same handle
    pointer = ctypes.POINTER(_ZngStream)
    init, inflate, reset, end = (
        lib.zng_inflateInit2,
        lib.zng_inflate,
        lib.zng_inflateReset,
        lib.zng_inflateEnd,
    )
    init.argtypes = inflate.argtypes = [pointer, ctypes.c_int32]
    reset.argtypes = end.argtypes = [pointer]
    init.restype = inflate.restype = reset.restype = end.restype = ctypes.c_int32
    name = f"zlib-ng {zlib_ng.ZLIBNG_VERSION}"
    return InflateLibrary(name, _ZngStream, init, inflate, reset, end)


def _bind_system_zlib() -> InflateLibrary:
    path = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(path)
    pointer = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    version: bytes = lib.zlibVersion()
    init2 = lib.inflateInit2_  # inflateInit2 is a macro adding the version and struct size
    init2.argtypes = [pointer, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    init2.restype = ctypes.c_int
    lib.inflate.argtypes, lib.inflate.restype = [pointer, ctypes.c_int], ctypes.c_int
    for func in (lib.inflateReset, lib.inflateEnd):
        func.argtypes, func.restype = [pointer], ctypes.c_int

    def init(stream: ctypes._Pointer[_ZStream], window_bits: int) -> int:
        return int(init2(stream, window_bits, version, _ZStream._guard.offset))

    return InflateLibrary(
        f"zlib {version.decode()}", _ZStream, init, lib.inflate, lib.inflateReset, lib.inflateEnd
    )


_BINDERS: dict[str, Callable[[], InflateLibrary]] = {
    "zlib-ng": _bind_zlib_ng,
    "zlib": _bind_system_zlib,
}


def _self_test(library: InflateLibrary) -> None:
    """Inflate a known two-block member block by block; raise if anything is off."""
    first, second = b"first block " * 500, b"second block " * 500
    compressor = zlib.compressobj(6, zlib.DEFLATED, GZIP_ONLY)
    head = compressor.compress(first) + compressor.flush(zlib.Z_FULL_FLUSH)
    blob = head + compressor.compress(second) + compressor.flush()
    inflater = BlockInflater(library)
    try:
        inflater.feed(blob)
        out = bytearray()
        boundaries: list[tuple[int, int]] = []
        while True:
            data, ended = inflater.inflate(1 << 16, stop_at_block=True)
            out += data
            if ended:
                break
            if inflater.at_block_boundary:
                boundaries.append((len(out), inflater.boundary_offset()[0]))
            if not data and not inflater.at_block_boundary:
                raise RuntimeError("inflate made no progress")
    finally:
        inflater.close()
    # full flush ends with an empty stored block: a boundary after `first`, at a byte edge
    if bytes(out) != first + second or (len(first), len(head)) not in boundaries:
        raise RuntimeError(f"{library.name} failed the block-boundary self-test")
    if inflater.consumed != len(blob):
        raise RuntimeError(f"{library.name} reports a wrong input count")


@functools.cache
def load_inflate_library(name: str | None = None) -> InflateLibrary:
    """The named library ("zlib-ng" or "zlib"), or the fastest one that passes its self-test."""
    if name is not None and name not in _BINDERS:
        raise ValueError(f"unknown inflate library {name!r} (known: {', '.join(_BINDERS)})")
    names = [name] if name is not None else list(_BINDERS)
    problems: list[str] = []
    for candidate in names:
        try:
            library = _BINDERS[candidate]()
            _self_test(library)
        except (OSError, AttributeError, ImportError, RuntimeError, InflateError) as exc:
            problems.append(f"{candidate}: {exc}")
            continue
        return library
    raise RuntimeError("no usable C inflate library (" + "; ".join(problems) + ")")


class BlockInflater:
    """One gzip stream (possibly several members, each after reset()), inflated in steps.

    feed() hands it the next input bytes once the previous ones are used up; inflate() writes at
    most `limit` bytes into an internal buffer and returns a view of them that stays valid only
    until the next call."""

    def __init__(self, library: InflateLibrary, output_size: int = 1 << 20) -> None:
        self._open = False
        self._lib = library
        self._stream = library.stream_type()
        self._ref = ctypes.pointer(self._stream)
        self._input = b""  # keeps the bytes next_in points into alive
        self._input_address = 0
        self._fed = 0  # bytes handed to feed() before the current input
        self._output = bytearray(output_size)
        self._output_view = memoryview(self._output)
        self._output_address = ctypes.addressof(
            (ctypes.c_char * output_size).from_buffer(self._output)
        )
        rc = library.init(self._ref, GZIP_ONLY)
        if rc != Z_OK:
            raise MemoryError(f"{library.name} inflateInit2 failed ({rc})")
        self._open = True

    @property
    def pending_input(self) -> int:
        """Bytes fed but not yet used by inflate."""
        return int(self._stream.avail_in)

    @property
    def consumed(self) -> int:
        """Input bytes used since the first feed(), across members."""
        return self._fed + len(self._input) - int(self._stream.avail_in)

    @property
    def at_block_boundary(self) -> bool:
        """Stopped between two blocks of a member (not after its last block)."""
        kind = int(self._stream.data_type)
        return bool(kind & _AT_BOUNDARY) and not kind & _LAST_BLOCK

    def boundary_offset(self) -> tuple[int, int]:
        """(compressed, bits) of the current position as zran records it: `compressed` is the
        first byte not yet touched, `bits` how many bits of the byte before it are unused."""
        unused = int(self._stream.data_type) & _BIT_COUNT
        return self.consumed - unused // 8, unused % 8

    def unused_input(self) -> memoryview:
        """The fed bytes inflate has not used (e.g. what follows a member)."""
        avail = int(self._stream.avail_in)
        return memoryview(self._input)[len(self._input) - avail :]

    def skip_input(self, count: int) -> None:
        """Mark `count` unused input bytes as consumed without inflating them (padding)."""
        avail = int(self._stream.avail_in)
        if not 0 <= count <= avail:
            raise ValueError(f"cannot skip {count} of {avail} pending bytes")
        self._stream.next_in = self._input_address + len(self._input) - avail + count
        self._stream.avail_in = avail - count

    def feed(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # next_in points into the object: it must be immutable
        if self._stream.avail_in:
            raise RuntimeError("feed() before the previous input was used up")
        if len(data) >= 1 << 32:
            raise ValueError("input chunk larger than 4 GiB")
        self._fed += len(self._input)
        self._input = data
        self._input_address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        self._stream.next_in = self._input_address
        self._stream.avail_in = len(data)

    def inflate(self, limit: int, *, stop_at_block: bool) -> tuple[memoryview, bool]:
        """Inflate up to `limit` bytes; returns (output, member ended). Stops early at the end
        of the input and, with stop_at_block, at the next block boundary."""
        if not self._open:
            raise RuntimeError("inflate() after close()")
        limit = min(limit, len(self._output))
        stream = self._stream
        stream.next_out = self._output_address
        stream.avail_out = limit
        rc = self._lib.inflate(self._ref, Z_BLOCK if stop_at_block else Z_NO_FLUSH)
        produced = limit - int(stream.avail_out)
        if rc not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            message = stream.msg.decode(errors="replace") if stream.msg else f"error {rc}"
            raise InflateError(message)
        return self._output_view[:produced], rc == Z_STREAM_END

    def reset(self) -> None:
        """Start a new member at the current input position."""
        if self._lib.reset(self._ref) != Z_OK:
            raise RuntimeError(f"{self._lib.name} inflateReset failed")

    def close(self) -> None:
        if self._open:
            self._open = False
            self._lib.end(self._ref)

    def __del__(self) -> None:
        self.close()
