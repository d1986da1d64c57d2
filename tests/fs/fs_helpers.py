"""Test layers for the lazy filesystem: a tar with every kind of entry a real layer has, its
index, what a correct lowerdir must show for it, and a small HTTP server answering Range."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from snapshotter.index.model import Compression, EntryType, LayerIndex, Span, TocEntry

SPAN_SIZE = 64 << 10  # small spans so that a few hundred KiB of files cross many of them
MTIME = 1_700_000_000
GZIP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def _data(seed: str, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 8  # compressible, but not trivially
    return bytes(out[:size])


@dataclass(frozen=True)
class Member:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    major: int = 0
    minor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


def rich_members() -> list[Member]:
    """Every case the tree must get right; names are relative, without "./"."""
    return [
        Member("etc", tarfile.DIRTYPE, mode=0o755),
        Member("etc/hosts", data=b"127.0.0.1 localhost\n"),
        Member("etc/empty"),
        Member("etc/dup", data=b"first version\n"),
        Member("etc/dup", data=b"second, longer version wins\n", mode=0o600),
        Member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
        Member("etc/link", tarfile.SYMTYPE, linkname="../usr/bin/tool", mode=0o777),
        Member("etc/dangling", tarfile.SYMTYPE, linkname="/nowhere/at/all", mode=0o777),
        # tar writers record other modes for symlinks (Python's tarfile: 0644); Linux shows 0777
        Member("etc/link-0644", tarfile.SYMTYPE, linkname="hosts", mode=0o644),
        Member("etc/link-0600", tarfile.SYMTYPE, linkname="/etc/shadow", mode=0o600, uid=5),
        Member(".wh.gone"),  # whiteout of a file in a lower layer
        Member("etc/.wh.removed"),
        Member("opaque", tarfile.DIRTYPE, mode=0o750, uid=7, gid=8),
        Member("opaque/.wh..wh..opq"),
        Member("opaque/kept", data=b"only me\n"),
        # parents usr/ and usr/bin/ are never listed: implicit 0755 root:root
        Member("usr/bin/tool", data=_data("tool", 150_000), mode=0o4755),
        Member("usr/bin/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool", mode=0o4755),
        Member("usr/bin/sgid", data=b"#!/bin/sh\n", mode=0o2711, uid=1000, gid=1000),
        Member("usr/lib/big.bin", data=_data("big", 5 * SPAN_SIZE + 1234)),
        Member("usr/lib/exact.bin", data=_data("exact", 2 * SPAN_SIZE)),
        Member("usr/share/tiny", data=b"x"),
        Member("dev", tarfile.DIRTYPE, mode=0o755),
        Member("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        Member("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
        Member("run/fifo", tarfile.FIFOTYPE, mode=0o644),
        Member("tmp", tarfile.DIRTYPE, mode=0o1777),
        Member(
            "usr/bin/cap",
            data=b"capable\n",
            mode=0o755,
            xattrs=(
                ("user.comment", b"hello world"),
                ("security.capability", bytes.fromhex("0100000200200000000000000000000000000000")),
            ),
        ),
    ]


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.uid, info.gid = member.uid, member.gid
            info.mtime = MTIME
            info.linkname = member.linkname
            info.devmajor, info.devminor = member.major, member.minor
            if member.xattrs:
                info.pax_headers = {
                    f"SCHILY.xattr.{key}": value.decode("latin-1") for key, value in member.xattrs
                }
            info.size = len(member.data) if member.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(member.data) if info.size else None)
    return buf.getvalue()


def gzip_tar(tar: bytes) -> bytes:
    return gzip.compress(tar, compresslevel=6, mtime=0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_TYPES = {
    tarfile.REGTYPE: EntryType.REG,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def toc_of(tar: bytes) -> tuple[TocEntry, ...]:
    entries = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for info in archive:
            xattrs = {
                key.removeprefix("SCHILY.xattr."): value.encode("latin-1")
                for key, value in info.pax_headers.items()
                if key.startswith("SCHILY.xattr.")
            }
            entries.append(
                TocEntry(
                    name=info.name.rstrip("/").removeprefix("./"),
                    type=_TYPES[info.type],
                    mode=info.mode & 0o7777,
                    uid=info.uid,
                    gid=info.gid,
                    size=info.size if info.isreg() else 0,
                    mtime_ns=int(info.mtime) * 1_000_000_000,
                    link_target=info.linkname,
                    devmajor=info.devmajor,
                    devminor=info.devminor,
                    xattrs=xattrs,
                    offset=info.offset_data if info.isreg() else 0,
                )
            )
    return tuple(entries)


def uncompressed_index(tar: bytes, span_size: int = SPAN_SIZE) -> LayerIndex:
    """A hand-made index of an uncompressed layer (spans = plain byte ranges)."""
    spans = []
    for start in range(0, len(tar), span_size):
        chunk = tar[start : start + span_size]
        end = start + len(chunk)
        spans.append(Span(start, end, start, end, sha256(chunk), sha256(chunk)))
    return LayerIndex(
        layer_digest=sha256(tar),
        layer_media_type="application/vnd.oci.image.layer.v1.tar",
        compression=Compression.NONE,
        compressed_size=len(tar),
        uncompressed_size=len(tar),
        span_size=span_size,
        entries=toc_of(tar),
        spans=tuple(spans),
    )


MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": GZIP_MEDIA_TYPE,
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def compress(tar: bytes, kind: str) -> bytes:
    """The layer blob: the tar as is, gzip, or zstd cut into independent frames (one span can
    only hold whole frames, so one frame per 64 KiB keeps the layer lazily readable)."""
    if kind == "tar":
        return tar
    if kind == "gzip":
        return gzip_tar(tar)
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3)
    step = 64 << 10
    return b"".join(compressor.compress(tar[i : i + step]) for i in range(0, len(tar), step))


def built_index(
    blob: bytes, kind: str, span_size: int = SPAN_SIZE, file_cut_min: int = 0
) -> LayerIndex:
    """The index the real builder makes for the blob (duplicates resolved, spans verified);
    file_cut_min > 0: spans also cut at file starts (`index build --file-cut-min`)."""
    from snapshotter.index.build import build_layer_index

    return build_layer_index(
        io.BytesIO(blob), media_type=MEDIA_TYPES[kind], span_size=span_size,
        file_cut_min=file_cut_min,
    )  # fmt: skip


# -- what the mounted layer must show -----------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int | None  # None: implicit directory, any time
    rdev: int = 0
    target: str = ""
    data: bytes | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    nlink: int | None = None


def expected_view(tar: bytes, workdir: Path) -> dict[str, Expected]:
    """Extract the tar with tarfile (as root: owners, modes, devices, hardlinks) and describe
    what an overlayfs lowerdir of this layer holds: whiteouts as 0/0 char devices, opaque
    markers as an xattr, xattrs from the PAX headers."""
    root = workdir / "extracted"
    root.mkdir()
    xattrs: dict[str, dict[str, bytes]] = {}
    listed: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for info in archive:
            listed.add(info.name.rstrip("/"))
            for key, value in info.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    xattrs.setdefault(info.name, {})[key.removeprefix("SCHILY.xattr.")] = (
                        value.encode("latin-1")
                    )
        archive.extractall(root, numeric_owner=True, filter="fully_trusted")
    view: dict[str, Expected] = {}
    for path in _walk(root):
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        name = path.name
        parent = str(path.parent.relative_to(root))
        parent = "" if parent == "." else parent + "/"
        if name == ".wh..wh..opq":
            continue
        if name.startswith(".wh."):
            view[parent + name.removeprefix(".wh.")] = Expected(
                stat.S_IFCHR, st.st_uid, st.st_gid, 0, MTIME * 10**9
            )
            continue
        extra = dict(xattrs.get(rel, {}))
        if stat.S_ISDIR(st.st_mode) and (path / ".wh..wh..opq").exists():
            extra["trusted.overlay.opaque"] = b"y"
        view[rel] = Expected(
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if not stat.S_ISDIR(st.st_mode) else 4096,
            # tarfile cannot set a symlink's own mtime; containerd does (lutimes)
            mtime_ns=(MTIME * 10**9 if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns)
            if rel in listed
            else None,
            rdev=st.st_rdev,
            target=os.readlink(path) if stat.S_ISLNK(st.st_mode) else "",
            data=path.read_bytes() if stat.S_ISREG(st.st_mode) else None,
            xattrs=tuple(sorted(extra.items())),
            nlink=st.st_nlink if stat.S_ISREG(st.st_mode) else None,
        )
    return view


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


# -- a blob server answering Range requests ----------------------------------------------------


class BlobServer:
    """Serves one blob at /blob over HTTP/1.1 with Range; counts the requests it answered.
    stop() closes the listening socket; start() listens again on the same port."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.requests: list[tuple[int, int]] = []
        self.delay = 0.0
        # A request whose range starts at one of these offsets waits until the event is set.
        self.gates: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified on each request
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/blob"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                header = self.headers.get("Range", "")
                first_text, _, last_text = header.removeprefix("bytes=").partition("-")
                first, last = int(first_text), int(last_text)
                with owner._lock:
                    owner.requests.append((first, last))
                    owner._arrived.notify_all()
                    delay = owner.delay
                    gate = owner.gates.get(first)
                if delay:
                    threading.Event().wait(delay)
                if gate is not None:
                    gate.wait(30)
                body = owner.blob[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(owner.blob)}")
                # No keep-alive: stop() must leave no connection that still answers.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for_requests(self, count: int, timeout: float = 10) -> None:
        """Block until at least count requests have arrived (answered or not)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} requests after {timeout:g} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)


def assert_tree_matches(root: Path, expected: dict[str, Expected], *, served: bool) -> None:
    """The tree under root is exactly what expected_view describes. served: root is a lazy
    mount, whose sizes and block counts are the tar's own (a copy on a real filesystem has
    that filesystem's symlink sizes and block allocation)."""
    found = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert found == set(expected)
    for rel, want in expected.items():
        path = root / rel
        st = os.lstat(path)
        assert st.st_mode == want.mode, rel
        assert (st.st_uid, st.st_gid, st.st_rdev) == (want.uid, want.gid, want.rdev), rel
        if (served or stat.S_ISLNK(st.st_mode)) and not stat.S_ISDIR(st.st_mode):
            assert st.st_size == want.size, rel
        if want.mtime_ns is not None:
            assert st.st_mtime_ns == want.mtime_ns, rel
        if want.nlink is not None:
            assert st.st_nlink == want.nlink, rel
        if want.target:
            assert os.readlink(path) == want.target, rel
        if want.data is not None:
            assert path.read_bytes() == want.data, rel
            if served:
                assert st.st_blocks == (want.size + 511) // 512, rel
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        assert tuple(sorted(xattrs.items())) == want.xattrs, rel
