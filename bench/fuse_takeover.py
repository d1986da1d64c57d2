"""Can a new process take over the FUSE connection of a killed one? The measurements behind
docs/how-it-works.md, "When a mount process dies" (root; uses a scratch dir under /tmp).

    sudo $PY -m bench.fuse_takeover                 # every scenario, a table on stdout
    sudo $PY -m bench.fuse_takeover --json out.json --throughput-mib 512

A supervisor (this script) opens /dev/fuse and mounts it itself (mount(2) with fd=N), or takes
a running server's fd with pidfd_getfd(2), and keeps it while a server is killed with SIGKILL
under a reader. Successors: a minimal protocol-level server written here (read-only mirror of a
directory, node id = the file's inode number, no per-open state; `--takeover` sends
FUSE_NOTIFY_RESEND first), or mfusepy on libfuse3 given /dev/fd/N. Scenarios:

    no-holder           nobody else holds the fd: what the reader gets
    resend              holder + protocol-level successor that sends NOTIFY_RESEND
    resend-overlay      the same, read through an overlay on the mount (a container's view)
    no-resend           the same without NOTIFY_RESEND (a request was in flight at the kill)
    libfuse-successor   mfusepy predecessor, mfusepy successor on /dev/fd/N
    nodeids             mfusepy predecessor, protocol-level successor
    throughput          cold sequential read through a fresh mount: protocol-level server
                        (one thread) against mfusepy (multi-threaded), 1 MiB reads

The protocol-level server is a measuring prototype, not product code: no xattrs, no
READDIRPLUS, one thread.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PYTHON = "/opt/lazysnap-venv/bin/python"  # has mfusepy
MIB = 1 << 20
SYS_PIDFD_GETFD = 438
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4

# -- the protocol-level server ---------------------------------------------------------------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
LOOKUP, FORGET, GETATTR, READLINK, OPEN, READ, STATFS = 1, 2, 3, 5, 14, 15, 17
INIT, OPENDIR, READDIR, INTERRUPT, DESTROY, BATCH_FORGET = 26, 27, 28, 36, 38, 42
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}
NOTIFY_RESEND = 7  # kernel 6.9+
FOPEN_KEEP_CACHE = 1 << 1
INIT_FLAGS_WANTED = (1 << 0) | (1 << 22)  # FUSE_ASYNC_READ, FUSE_MAX_PAGES
MAX_PAGES = 256  # 1 MiB requests
TIMEOUT_S = 86400


class MirrorTree:
    """Paths by node id: every file's inode number, the root's is 1."""

    def __init__(self, root: str) -> None:
        self.root_ino = os.lstat(root).st_ino
        self.paths: dict[int, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for path in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                self.paths[self.nodeid(os.lstat(path).st_ino)] = path

    def nodeid(self, ino: int) -> int:
        return 1 if ino == self.root_ino else ino

    def attr(self, st: os.stat_result) -> bytes:
        return ATTR.pack(
            self.nodeid(st.st_ino), st.st_size, st.st_blocks, int(st.st_atime),
            int(st.st_mtime), int(st.st_ctime), 0, 0, 0, st.st_mode, st.st_nlink, st.st_uid,
            st.st_gid, 0, 4096, 0,
        )  # fmt: skip


def serve_protocol(fd: int, root: str, *, takeover: bool, resend: bool, slow: bool) -> None:
    tree = MirrorTree(root)
    files: dict[str, int] = {}
    if takeover and resend:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
    while True:
        try:
            buf = os.read(fd, MAX_PAGES * 4096 + 8192)
        except OSError:  # ENODEV once unmounted
            return
        length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
        body = buf[IN_HEADER.size : length]
        if opcode in NO_REPLY:
            continue
        try:
            out = _answer(tree, files, opcode, nodeid, body, slow)
            reply = [OUT_HEADER.pack(OUT_HEADER.size + len(out), 0, unique), out]
        except OSError as exc:
            reply = [OUT_HEADER.pack(OUT_HEADER.size, -(exc.errno or errno.EIO), unique)]
        try:
            os.writev(fd, reply)  # one write per reply, as the kernel wants; no joined copy
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted
                raise
        if opcode == DESTROY:
            return


def _answer(
    tree: MirrorTree, files: dict[str, int], opcode: int, nodeid: int, body: bytes, slow: bool
) -> bytes:
    if opcode == INIT:
        _major, _minor, max_readahead, flags = struct.unpack_from("<IIII", body)
        return struct.pack(
            "<IIIIHHIIHHI", 7, 38, max_readahead, flags & INIT_FLAGS_WANTED, 16, 12, MIB, 1,
            MAX_PAGES, 0, 0,
        ) + bytes(28)  # fmt: skip
    if opcode == DESTROY:
        return b""
    path = tree.paths.get(nodeid)
    if path is None:  # a node id this server never handed out
        raise OSError(errno.ENOENT, f"unknown node id {nodeid}")
    if opcode == LOOKUP:
        st = os.lstat(os.path.join(path, body.rstrip(b"\0").decode()))
        entry = struct.pack("<QQQQII", tree.nodeid(st.st_ino), 0, TIMEOUT_S, TIMEOUT_S, 0, 0)
        return entry + tree.attr(st)
    if opcode == GETATTR:
        return struct.pack("<QII", TIMEOUT_S, 0, 0) + tree.attr(os.lstat(path))
    if opcode == READLINK:
        return os.readlink(path).encode()
    if opcode in (OPEN, OPENDIR):  # no per-open state: any process can answer later requests
        return struct.pack("<QII", 0, FOPEN_KEEP_CACHE if opcode == OPEN else 0, 0)
    if opcode == READ:
        _fh, offset, size = struct.unpack_from("<QQI", body)
        if slow:
            time.sleep(0.2)
        if path not in files:
            files[path] = os.open(path, os.O_RDONLY)
        return os.pread(files[path], size, offset)
    if opcode == READDIR:
        _fh, offset, size = struct.unpack_from("<QQI", body)
        out = b""
        names = [".", "..", *sorted(os.listdir(path))]
        for number, name in enumerate(names[offset:], start=offset + 1):
            st = os.lstat(path if name in (".", "..") else os.path.join(path, name))
            raw = name.encode()
            kind = stat.S_IFMT(st.st_mode) >> 12
            dirent = struct.pack("<QQII", tree.nodeid(st.st_ino), number, len(raw), kind) + raw
            dirent += bytes(-len(dirent) % 8)
            if len(out) + len(dirent) > size:
                break
            out += dirent
        return out
    if opcode == STATFS:
        return struct.pack("<QQQQQIIII", 0, 0, 0, 0, 0, 4096, 255, 4096, 0) + bytes(24)
    raise OSError(errno.ENOSYS, "not implemented")  # RELEASE, FLUSH, GETXATTR, ...


def serve_mfusepy(mountpoint: str, root: str, threads: bool) -> None:
    os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")
    import mfusepy

    handles: dict[str, int] = {}

    class Mirror(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            if config is not None:
                config.use_ino = 1
                config.kernel_cache = 1
                config.entry_timeout = config.attr_timeout = float(TIMEOUT_S)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            try:
                st = os.lstat(root + path)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno) from None
            keys = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size")
            return {key: getattr(st, key) for key in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *sorted(os.listdir(root + path))]

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if path not in handles:
                handles[path] = os.open(root + path, os.O_RDONLY)
            return os.pread(handles[path], size, offset)

    mfusepy.FUSE(Mirror(), mountpoint, foreground=True, ro=True, nothreads=not threads)


# -- the supervisor --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class Bench:
    def __init__(self, scratch: Path) -> None:
        self.mnt = scratch / "mnt-0"
        self.mounts = 0
        self.backing = scratch / "backing"
        self.mnt.mkdir(parents=True, exist_ok=True)
        (self.backing / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
        for number in range(50):
            (self.backing / "sub" / "deeper" / f"f{number}").write_text(f"file {number}\n")

    def big_file(self, mib: int) -> tuple[str, str]:
        """backing/sub/big-<mib>.bin of random bytes; its name and SHA-256."""
        path = self.backing / "sub" / f"big-{mib}.bin"
        if not path.exists():
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(MIB))
        return f"sub/{path.name}", hashlib.sha256(path.read_bytes()).hexdigest()

    def fresh_mountpoint(self) -> None:
        """A new empty mountpoint, so that nothing a scenario left behind is in the way."""
        self.unmount()
        self.mounts += 1
        self.mnt = self.mnt.with_name(f"mnt-{self.mounts}")
        self.mnt.mkdir()

    def mount_held(self) -> int:
        """Open /dev/fuse and mount it at mnt ourselves; the fd stays ours."""
        self.unmount()
        fd = os.open("/dev/fuse", os.O_RDWR)
        options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if _libc.mount(b"takeover", str(self.mnt).encode(), b"fuse.takeover", flags, options):
            raise OSError(ctypes.get_errno(), f"mount {self.mnt}")
        return fd

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)

    def protocol_server(self, fd: int, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, __file__, "serve-protocol", str(fd), str(self.backing), *extra]
        return subprocess.Popen(argv, pass_fds=(fd,))

    def mfusepy_server(self, mountpoint: str, *, threads: bool = False, fd: int = -1) -> Any:
        argv = [PYTHON, __file__, "serve-mfusepy", mountpoint, str(self.backing)]
        pass_fds = (fd,) if fd >= 0 else ()
        return subprocess.Popen([*argv, *(["--threads"] if threads else [])], pass_fds=pass_fds)

    def wait_mounted(self) -> int:
        deadline = time.monotonic() + 10
        while os.stat(self.mnt).st_dev == os.stat(self.mnt.parent).st_dev:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mnt} not mounted")
            time.sleep(0.005)
        return os.stat(self.mnt).st_dev

    def overlay(self) -> Path:
        """An overlay with the mount as its lowerdir, as a container's rootfs has."""
        base = self.mnt.with_name(self.mnt.name + "-overlay")
        for directory in ("rootfs", "upper", "work"):
            (base / directory).mkdir(parents=True)
        options = f"lowerdir={self.mnt},upperdir={base}/upper,workdir={base}/work"
        rootfs = str(base / "rootfs")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, rootfs], check=True)
        return base / "rootfs"

    def reader(self, path: Path, expected: str) -> subprocess.Popen[str]:
        """Reads path in 1 MiB preads (20 ms apart); prints 'ok <longest gap>' or the error."""
        code = f"""
import hashlib, os, sys, time
fd = os.open({str(path)!r}, os.O_RDONLY)
digest, offset, last, gap = hashlib.sha256(), 0, time.monotonic(), 0.0
while True:
    try:
        data = os.pread(fd, 1 << 20, offset)
    except OSError as exc:
        print("error", exc.strerror, "at MiB", offset >> 20, flush=True); sys.exit(1)
    now = time.monotonic(); gap = max(gap, now - last); last = now
    if not data: break
    digest.update(data); offset += len(data); time.sleep(0.02)
print("ok" if digest.hexdigest() == {expected!r} else "WRONG BYTES", "%.2f" % gap, flush=True)
"""
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    def probe(self, relative: str, base: Path | None = None) -> str:
        """Read a file through the mount in a child (a hang must not stop the script)."""
        code = f"print(open({str((base or self.mnt) / relative)!r}).read().strip())"
        try:
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return "hangs"
        return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def _cpu_seconds(pid: int) -> float:
    ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")


def _kill(process: subprocess.Popen[Any]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def _finish(reader: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = reader.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(reader)
        return f"still blocked after {timeout:.0f} s"
    return out.strip()


def scenario_kill(
    bench: Bench, *, hold: bool, successor: str, overlay: bool = False
) -> dict[str, Any]:
    name, expected = bench.big_file(64)
    bench.fresh_mountpoint()
    fd = bench.mount_held()
    first = bench.protocol_server(fd, "--slow")  # 0.2 s per READ: one is in flight at the kill
    if not hold:
        os.close(fd)
    bench.wait_mounted()
    base = bench.overlay() if overlay else bench.mnt
    reader = bench.reader(base / name, expected)
    time.sleep(0.5)
    _kill(first)
    time.sleep(2.0)
    result: dict[str, Any] = {"reader_alive_2s_after_kill": reader.poll() is None}
    if hold:
        result["wchan"] = Path(f"/proc/{reader.pid}/wchan").read_text()
        extra = ["--takeover"] + ([] if successor == "resend" else ["--no-resend"])
        started = time.monotonic()
        second = bench.protocol_server(fd, *extra)
        result["reader"] = _finish(reader, 20)
        result["seconds_after_successor_start"] = round(time.monotonic() - started, 2)
        result["new_lookup_in_known_dir"] = bench.probe("sub/deeper/f49", base)
        if overlay:
            subprocess.run(["umount", str(base)], check=True)
        bench.unmount()
        second.wait(10)
        os.close(fd)
    else:
        result["reader"] = _finish(reader, 20)
        bench.unmount()
    return result


def scenario_after_mfusepy(bench: Bench, successor: str) -> dict[str, Any]:
    bench.fresh_mountpoint()
    first = bench.mfusepy_server(str(bench.mnt))
    bench.wait_mounted()
    fuse_fd = next(
        int(n)
        for n in os.listdir(f"/proc/{first.pid}/fd")
        if os.readlink(f"/proc/{first.pid}/fd/{n}") == "/dev/fuse"
    )
    pidfd = os.pidfd_open(first.pid)
    held = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fuse_fd, 0)
    os.close(pidfd)
    if held < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    result = {"before": bench.probe("sub/deeper/f1")}  # node ids for sub, sub/deeper
    _kill(first)
    if successor == "mfusepy":
        second = bench.mfusepy_server(f"/dev/fd/{held}", fd=held)
    else:
        second = bench.protocol_server(held, "--takeover")
    time.sleep(1.5)
    result["after: read sub/deeper/f2"] = bench.probe("sub/deeper/f2")
    result["after: read sub/big-64.bin"] = bench.probe("sub/big-64.bin")[:40]
    bench.unmount()
    if second.poll() is None:
        _kill(second)
    os.close(held)
    return result


def scenario_throughput(bench: Bench, mib: int, rounds: int) -> dict[str, Any]:
    name, _ = bench.big_file(mib)
    (bench.backing / name).read_bytes()  # the backing file in the page cache
    figures: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for kind in ("protocol", "mfusepy-mt"):
            bench.fresh_mountpoint()
            if kind == "protocol":
                fd = bench.mount_held()
                server = bench.protocol_server(fd)
                os.close(fd)
            else:
                bench.unmount()
                server = bench.mfusepy_server(str(bench.mnt), threads=True)
            device = bench.wait_mounted()
            bdi = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
            Path(bdi).write_text("4096\n")
            cpu_before = _cpu_seconds(server.pid)  # start-up (imports, tree walk) left out
            started = time.monotonic()
            size = 0
            with open(bench.mnt / name, "rb", buffering=0) as f:
                while chunk := f.read(MIB):
                    size += len(chunk)
            seconds = time.monotonic() - started
            cpu = _cpu_seconds(server.pid) - cpu_before
            bench.unmount()
            server.wait(10)
            figures.setdefault(kind, []).append((size / seconds / 1e6, cpu / (size / 1e9)))
    return {
        kind: {
            "MB/s, runs sorted": [round(v) for v in sorted(f[0] for f in runs)],
            "server CPU s/GB, runs sorted": [round(v, 2) for v in sorted(f[1] for f in runs)],
        }
        for kind, runs in figures.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuse_takeover", description=__doc__.split("\n", 1)[0]
    )
    sub = parser.add_subparsers(dest="command")
    proto = sub.add_parser("serve-protocol")
    proto.add_argument("fd", type=int)
    proto.add_argument("root")
    proto.add_argument("--takeover", action="store_true")
    proto.add_argument("--no-resend", action="store_true")
    proto.add_argument("--slow", action="store_true")
    hl = sub.add_parser("serve-mfusepy")
    hl.add_argument("mountpoint")
    hl.add_argument("root")
    hl.add_argument("--threads", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--throughput-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "serve-protocol":
        serve_protocol(
            args.fd, args.root, takeover=args.takeover, resend=not args.no_resend, slow=args.slow
        )
        return 0
    if args.command == "serve-mfusepy":
        serve_mfusepy(args.mountpoint, args.root, args.threads)
        return 0
    with tempfile.TemporaryDirectory(prefix="fuse-takeover-") as scratch:
        bench = Bench(Path(scratch))
        try:
            results = {
                "no-holder": scenario_kill(bench, hold=False, successor=""),
                "resend": scenario_kill(bench, hold=True, successor="resend"),
                "no-resend": scenario_kill(bench, hold=True, successor="no-resend"),
                "resend-overlay": scenario_kill(bench, hold=True, successor="resend", overlay=True),
                "libfuse-successor": scenario_after_mfusepy(bench, "mfusepy"),
                "nodeids": scenario_after_mfusepy(bench, "protocol"),
                "throughput": scenario_throughput(bench, args.throughput_mib, args.rounds),
            }
        finally:
            bench.unmount()
    for name, result in results.items():
        print(f"{name:18s} {json.dumps(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
