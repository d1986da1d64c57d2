"""Run one docker credential helper (`docker-credential-<name> get`) by its documented protocol.

The server URL goes to the helper's stdin; its stdout is `{"ServerURL", "Username", "Secret"}`.
Bounded: the helper is killed (with its process group) after `timeout` seconds or once it writes
more than `max_output` bytes. The secret is only ever held in memory: it is not logged, not put
in argv, and no error message here quotes the helper's successful answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

HELPER_PREFIX = "docker-credential-"
HUB_SERVER_URL = "https://index.docker.io/v1/"  # what docker passes to helpers for Docker Hub
TOKEN_USERNAME = "<token>"  # the helper's Secret is then an identity (OAuth2 refresh) token
DEFAULT_HELPER_TIMEOUT = 10.0  # seconds
DEFAULT_MAX_OUTPUT = 64 * 1024  # bytes, stdout and stderr each; answers are a few hundred bytes
_NOT_FOUND = "credentials not found"  # docker's ErrCredentialsNotFound message starts so


class HelperError(Exception):
    """The helper could not answer: missing, timed out, failed, or answered garbage."""


@dataclass(frozen=True)
class HelperAnswer:
    username: str
    secret: str = field(repr=False)

    @property
    def is_identity_token(self) -> bool:
        return self.username == TOKEN_USERNAME


def helper_server_url(host: str) -> str:
    """The server URL docker hands a helper: Hub's legacy index URL, else host[:port]."""
    return HUB_SERVER_URL if host == "docker.io" else host


def run_helper(
    name: str,
    server_url: str,
    *,
    timeout: float = DEFAULT_HELPER_TIMEOUT,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> HelperAnswer | None:
    """The helper's credentials for `server_url`, or None when it has none ("not found").
    Raises HelperError (whose message names no secret) for every other outcome."""
    program = HELPER_PREFIX + name
    deadline = time.monotonic() + timeout
    try:
        # The environment is inherited: helpers need HOME, PATH, GNUPGHOME, DBUS_SESSION_...
        proc = subprocess.Popen(
            [program, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout kills what the helper started (gpg, …) too
        )
    except FileNotFoundError:
        raise HelperError(f"{program} is not on PATH") from None
    except OSError as exc:
        raise HelperError(f"{program} cannot be started: {exc.strerror or exc}") from None
    try:
        stdout, stderr = _exchange(proc, server_url.encode(), deadline, max_output, program)
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise HelperError(f"{program} did not answer within {timeout:g} s (killed)") from None
    finally:
        if proc.poll() is None:
            _kill(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if returncode != 0:
        said = _one_line(stdout) or _one_line(stderr)
        if _NOT_FOUND in said.lower():
            return None
        raise HelperError(f"{program} exited with status {returncode}: {said or '(no output)'}")
    return _parse_answer(stdout, program)


def _exchange(
    proc: subprocess.Popen[bytes], request: bytes, deadline: float, max_output: int, program: str
) -> tuple[bytes, bytes]:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(request)  # a few bytes: fits the pipe buffer, cannot block
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the helper exited without reading; its exit status tells why
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(program, 0)
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > max_output:
                    raise HelperError(f"{program} wrote more than {max_output} bytes (killed)")
    return bytes(buffers[out_fd]), bytes(buffers[err_fd])


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _one_line(data: bytes) -> str:
    """An error message a failed helper printed, cut to one short line for a log."""
    text = data.decode(errors="replace").strip()
    first = text.splitlines()[0] if text else ""
    return first[:200]


def _parse_answer(stdout: bytes, program: str) -> HelperAnswer | None:
    # The answer holds the secret: no message below quotes it.
    try:
        doc = json.loads(stdout)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HelperError(f"{program} answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise HelperError(f"{program} answered JSON that is not an object")
    username, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str):
        raise HelperError(f"{program} answered without string Username and Secret")
    if not secret:
        return None
    return HelperAnswer(username, secret)
