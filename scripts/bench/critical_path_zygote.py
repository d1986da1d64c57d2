"""A mount-process zygote for `critical_path.py mount-startup --zygote` (measurement only:
lazysnap has no zygote; this measures what one would save).

    python critical_path_zygote.py SOCKET_FD      (PYTHONPATH: the checkout to measure)

Imports everything a mount process imports, says "imported" on the unix socket SOCKET_FD, then
for each request (a spec path, with the ready pipe's write end passed as SCM_RIGHTS) forks a
child that runs snapshotter.fs.mount_process.run(spec, fd) in its own session, with its output
in mount.log beside the spec, and answers the child's pid. Exits at EOF.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys


def _serve_child(spec_path: str, ready_fd: int) -> int:
    from snapshotter.fs import mount_process

    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    log = os.open(
        os.path.join(os.path.dirname(spec_path), "mount.log"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s lazysnap-mount[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    return mount_process.run(mount_process.MountSpec.load(spec_path), ready_fd)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: critical_path_zygote.py SOCKET_FD", file=sys.stderr)
        return 2
    channel = socket.socket(fileno=int(argv[0]))
    # What a mount process imports before it serves (snapshotter/fs/mount_process.py and the
    # modules it and open_blob_source import lazily).
    import snapshotter.fs.blob_source
    import snapshotter.fs.fuse_ops
    import snapshotter.fs.mount_process
    import snapshotter.index.codec
    import snapshotter.index.spans
    import snapshotter.remote.auth
    import snapshotter.remote.blob
    import snapshotter.remote.client
    import snapshotter.remote.hosts  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the mount children
    channel.sendall(b"imported\n")
    buffer = b""
    while True:
        message, fds, _flags, _address = socket.recv_fds(channel, 4096, 1)
        if not message:
            return 0
        buffer += message
        if not buffer.endswith(b"\n") or len(fds) != 1:
            channel.sendall(b"error: expected one spec path line with one fd\n")
            for fd in fds:
                os.close(fd)
            buffer = b""
            continue
        spec_path, buffer = buffer.decode().strip(), b""
        pid = os.fork()
        if pid == 0:
            channel.close()
            code = 1
            try:
                code = _serve_child(spec_path, fds[0])
            finally:
                os._exit(code)
        os.close(fds[0])
        channel.sendall(f"{pid}\n".encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
