"""A pre-started, pre-imported process that forks children on request (`[fuse] zygote`).

A fresh interpreter importing the FUSE binding, the index decoder and the HTTP stack costs
~0.2 s per lazy layer before it can mount; a fork of a process that already imported them
costs a few ms. This module is a generic fork server: it knows nothing of what its children
become. The daemon starts one zygote with the module its children run (Zygote.start):

    python -m MODULE --zygote-fd FD

MODULE's main() hands serve() its preload function (what its children import before they
work) and, in each forked child, turns the request serve() returns into its own arguments
(become_child() first). For each request on the unix socket FD (one argument string, with the
ready pipe's write end, the log file and optionally one more fd for the child's main passed as
SCM_RIGHTS), the zygote forks a child that
becomes exactly what the daemon otherwise starts plainly: its own session, stdin /dev/null,
stdout and stderr the log, cwd /, then MODULE's main and a normal interpreter exit. The zygote
answers the child's pid and only then lets the child go on, so a child runs only if the daemon
was told its pid. (The mount processes are MODULE snapshotter.fs.mount_process.)

Identity: a forked child keeps the zygote's command line, which names MODULE, so the daemon
recognises it (and adopts it after a restart) exactly as a plain one; the zygote itself names
itself ZYGOTE_NAME (/proc/PID/comm) and is told apart by that.

The zygote stays single-threaded (fork() in a threaded process may copy a held lock), reaps its
children (their exit statuses go to its log, the daemon's stderr), and exits when the daemon's
end of the socket closes: when the daemon stops or dies. Mount processes outlive both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("lazysnap.fs")

ZYGOTE_NAME = "lazysnap-zygote"  # /proc/PID/comm of the zygote (at most 15 characters)
FORKED_NAME = "lazysnap-mount"  # ... and of the mount processes it forks
ANSWER_TIMEOUT_S = 10.0  # the first answer waits for the zygote's imports (~0.2 s, more if busy)
STOP_TIMEOUT_S = 2.0
REAP_INTERVAL_S = 1.0
MAX_REQUEST_BYTES = 1 << 16


class ZygoteError(Exception):
    """The zygote cannot fork a child now; the message says why."""


@dataclass(frozen=True)
class ChildRequest:
    """What a forked child was asked to do: one argument (the mount processes: their spec
    path), the fds it reports on and logs to, and an optional extra fd its main reads (the
    mount processes: their image's pull credentials); all its own fd numbers."""

    argument: str
    ready_fd: int
    log_fd: int
    extra_fd: int | None = None


# -- the daemon's side -----------------------------------------------------------------------


class ForkedChild:
    """A process forked by the zygote: not the daemon's child, so it is followed through a
    pidfd (no pid reuse can fool it). Quacks like the subprocess.Popen of a plain one, except
    that its exit status goes to the zygote: poll() and wait() give -1 once it has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already (and reaped by the zygote)
            self._pidfd = None

    def poll(self) -> int | None:
        return None if self._running(0) else -1

    def wait(self, timeout: float | None = None) -> int:
        if self._running(timeout):
            raise subprocess.TimeoutExpired(f"process {self.pid}", timeout or 0.0)
        return -1

    def send_signal(self, signum: int) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _running(self, timeout: float | None) -> bool:
        if self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], timeout)  # readable: it exited
        return not readable


class Zygote:
    """The daemon's handle on one zygote process. fork() may be called from any thread."""

    def __init__(self, process: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self.process = process
        self._channel = channel
        self._lock = threading.Lock()  # one request and its answer at a time

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, python: str, module: str) -> Zygote:
        """A zygote running `python -m module --zygote-fd FD` (module's main calls serve())."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [python, "-m", module, "--zygote-fd", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's ^C stops the daemon, which stops it
                cwd="/",
            )
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"cannot start it: {exc}") from exc
        finally:
            theirs.close()
        return cls(process, ours)

    def fork(
        self, argument: str, ready_fd: int, log_fd: int, extra_fd: int | None = None
    ) -> ForkedChild:
        """A child for argument, reporting on ready_fd, writing to log_fd, given extra_fd too
        (all stay the caller's to close). Raises ZygoteError if the zygote does not answer
        with one."""
        with self._lock:
            status = self.process.poll()
            if status is not None:
                raise ZygoteError(f"it exited ({_exit_text(status)})")
            fds = [ready_fd, log_fd] + ([] if extra_fd is None else [extra_fd])
            request = json.dumps({"argument": argument, "extra_fd": len(fds) == 3}).encode()
            try:
                socket.send_fds(self._channel, [request], fds)
            except OSError as exc:
                raise ZygoteError(self._gone(f"sending it the request: {exc}")) from exc
            try:
                return self._answer(ANSWER_TIMEOUT_S)
            except TimeoutError:
                # Stop it, then take an answer it sent meanwhile: its child may be running.
                self._kill()
                try:
                    return self._answer(0)
                except TimeoutError:
                    raise ZygoteError(f"no answer within {ANSWER_TIMEOUT_S:g}s") from None

    def close(self) -> None:
        """Stop the zygote (closing its socket ends it); the processes it forked live on."""
        self._channel.close()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()

    def _answer(self, timeout: float) -> ForkedChild:
        readable, _, _ = select.select([self._channel], [], [], timeout)
        if not readable:
            raise TimeoutError
        try:
            data = self._channel.recv(MAX_REQUEST_BYTES)
        except OSError as exc:
            raise ZygoteError(self._gone(f"reading its answer: {exc}")) from exc
        if not data:
            raise ZygoteError(self._gone("it closed its socket"))
        try:
            answer = json.loads(data)
        except json.JSONDecodeError:
            raise ZygoteError(f"unreadable answer {data[:100]!r}") from None
        if isinstance(answer, dict) and isinstance(answer.get("pid"), int):
            return ForkedChild(answer["pid"])
        raise ZygoteError(str(answer.get("error") if isinstance(answer, dict) else answer))

    def _gone(self, otherwise: str) -> str:
        """Why the zygote stopped talking: its exit, if it has exited (or does so at once)."""
        try:
            return f"it exited ({_exit_text(self.process.wait(STOP_TIMEOUT_S))})"
        except subprocess.TimeoutExpired:
            return otherwise

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)


def _exit_text(status: int | None) -> str:
    if status is None:
        return "still running"
    return f"signal {-status}" if status < 0 else f"status {status}"


# -- the zygote's side -----------------------------------------------------------------------


def serve(channel_fd: int, preload: Callable[[], None]) -> ChildRequest | None:
    """The zygote's loop, after preload() (the imports its children need). Returns None when
    the zygote should exit, or, in a forked child, the request the child is to serve (the
    caller then calls become_child() and runs its own main)."""
    _set_process_name(ZYGOTE_NAME)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s lazysnap-zygote[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    channel = socket.socket(fileno=channel_fd)
    preload()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        log.error("%d threads after the preload: forking is not safe", threads)
        raise SystemExit(1)
    while True:
        readable, _, _ = select.select([channel], [], [], REAP_INTERVAL_S)
        _reap()
        if not readable:
            continue
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, MAX_REQUEST_BYTES, 3)
        except OSError as exc:
            log.error("reading a request: %s", exc)
            return None
        if not message:
            return None  # the daemon closed its end: it stopped
        request = _request(message, fds)
        if request is None:
            for fd in fds:
                os.close(fd)
            _send(channel, {"error": f"bad request {message[:100]!r}"})
            continue
        child = _fork(channel, request)
        if child is not None:
            return child


def become_child(request: ChildRequest) -> None:
    """In a forked child: take what the daemon's plain start gives a child (own session, stdin
    /dev/null, output to the log, cwd /); the caller then runs its main for request."""
    os.setsid()
    _set_process_name(FORKED_NAME)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(request.log_fd, 1)
    os.dup2(request.log_fd, 2)
    os.close(request.log_fd)
    os.chdir("/")
    logging.root.handlers.clear()  # the child's main sets up its own log format


def _request(message: bytes, fds: list[int]) -> ChildRequest | None:
    try:
        fields = json.loads(message)
        argument, extra = fields.get("argument"), fields.get("extra_fd") is True
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(argument, str) or len(fds) != (3 if extra else 2):
        return None
    return ChildRequest(argument, fds[0], fds[1], fds[2] if extra else None)


def _fork(channel: socket.socket, request: ChildRequest) -> ChildRequest | None:
    """Fork a child for request: None in the zygote, request in the child. The child waits
    until its pid was sent, and exits if it never was."""
    go_read, go_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        channel.close()
        go = os.read(go_read, 1)
        os.close(go_read)
        if go != b"g":
            os._exit(1)  # the zygote died before answering: nobody expects this child
        return request
    os.close(go_read)
    os.close(request.ready_fd)  # the child's alone now: its exit must reach the daemon as EOF
    os.close(request.log_fd)
    if request.extra_fd is not None:
        os.close(request.extra_fd)
    try:
        if _send(channel, {"pid": pid}):
            os.write(go_write, b"g")
    finally:
        os.close(go_write)
    return None


def _send(channel: socket.socket, answer: dict[str, object]) -> bool:
    try:
        channel.send(json.dumps(answer).encode())
    except OSError as exc:
        log.error("answering the daemon: %s", exc)
        return False
    return True


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.info("child %d exited (%s)", pid, _exit_text(code))


def _set_process_name(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError as exc:  # only ps and the identity check see it
        log.warning("cannot name the process %s: %s", name, exc)
