"""`lazysnap pull` run by `lazysnap serve` through its pull socket (snapshotter/pull/wire.py):
the same image, layers and output as a pull in the CLI's own process, errors reported by the
CLI as before, and the daemon unharmed by a client that sends nonsense."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat

import pytest

from snapshotter.pull.wire import pull_socket_for
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack

FILES = {"hello": 1000, "big": 300_000}
DAEMON_PULL_LINE = "for a `lazysnap pull` client"


def _pushed_and_indexed(stack: LazyStack, name: str) -> tuple[str, str]:
    """The reference of a new indexed image, and the sha256 of its /data/hello."""
    image = build_data_image(stack.workdir / name, FILES, one_layer=True)
    pushed = stack.push(image.built, unique_name(f"test/{name}"))
    stack.index_build(pushed.reference)
    return pushed.reference, hashlib.sha256(image.files["data/hello"]).hexdigest()


def _hello_digest(stack: LazyStack, reference: str) -> str:
    return stack.run_ok(reference, "sha256sum", "/data/hello").split()[0]


def test_the_daemon_runs_the_pull_and_the_container_starts(stack: LazyStack) -> None:
    pull_socket = pull_socket_for(str(stack.daemon.socket))
    mode = os.stat(pull_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600  # root's only
    reference, hello = _pushed_and_indexed(stack, "lazy-daemon-pull")
    since = stack.daemon_log_offset()
    pulled = stack.pull(reference)
    assert (pulled.lazy, pulled.pulled) == (1, 0), pulled.stdout
    assert f"pull of {reference} {DAEMON_PULL_LINE}" in stack.daemon_log_since(since)
    assert _hello_digest(stack, reference) == hello


def test_no_daemon_pulls_in_the_clients_own_process(stack: LazyStack) -> None:
    reference, hello = _pushed_and_indexed(stack, "lazy-own-pull")
    since = stack.daemon_log_offset()
    pulled = stack.pull(reference, through_daemon=False)
    assert (pulled.lazy, pulled.pulled) == (1, 0), pulled.stdout
    assert DAEMON_PULL_LINE not in stack.daemon_log_since(since)
    assert _hello_digest(stack, reference) == hello


def test_a_failed_pull_in_the_daemon_is_reported_by_the_cli(stack: LazyStack) -> None:
    reference = f"{stack.registry.host}/test/{unique_name('missing')}:1"
    result = stack.lazysnap(
        "pull",
        "--daemon-address",
        str(stack.daemon.socket),
        "--address",
        str(stack.containerd.address),
        "--namespace",
        stack.namespace,
        "--hosts-dir",
        str(stack.containerd.hosts_dir),
        reference,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("lazysnap pull: error: ")
    assert reference in result.stderr and "Traceback" not in result.stderr


def test_a_client_that_sends_nonsense_gets_an_error_and_the_daemon_keeps_serving(
    stack: LazyStack,
) -> None:
    pull_socket = pull_socket_for(str(stack.daemon.socket))
    for garbage, expected in (
        (b"not json\n", "one line of JSON"),
        (b'{"image": "x"}\n', "'address'"),
        (
            json.dumps(
                {"image": "a", "address": "b", "namespace": "c", "snapshotter": "d", "evil": 1}
            ).encode()
            + b"\n",
            "unknown keys",
        ),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(pull_socket)
            client.sendall(garbage)
            answer = json.loads(client.makefile("rb").readline())
        assert answer["event"] == "error" and expected in answer["message"], answer
    # still serving pulls
    reference, _ = _pushed_and_indexed(stack, "lazy-after-nonsense")
    assert stack.pull(reference).lazy == 1
