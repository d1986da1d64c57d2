"""What every subcommand prints when things go wrong for the user, through the real stack: a
reader that goes away (`lazysnap index show IMAGE | head -1`) ends the command quietly, as
SIGPIPE would, never with a traceback; an asked-for platform the image lacks is an error in
index build, index show and pull, naming the image once."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.daemon import lazysnap_command
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import OCI_INDEX, Descriptor, Platform, build_index
from snapshotter.remote.reference import Reference
from tests.lazy.lazy_helpers import REPO_ROOT, LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack

EXIT_BROKEN_PIPE = 141
ABSENT = "windows/arm64"


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `lazysnap ARGS` with stdout a pipe whose reader is already gone: its first write
    fails (EPIPE), whenever it comes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*lazysnap_command(), *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    finally:
        os.close(write_end)


def assert_quiet(result: subprocess.CompletedProcess[str], *, printed: bool = True) -> None:
    for noise in ("Traceback", "BrokenPipe", "Exception ignored"):
        assert noise not in result.stderr, f"{result.args}:\n{result.stderr}"
    if printed:  # stopped by the closed pipe, as SIGPIPE would end it
        assert result.returncode == EXIT_BROKEN_PIPE, (result.args, result.stderr)


def push_data_image(stack: LazyStack, name: str) -> str:
    image = build_data_image(stack.workdir / name, {"hello": 1000}, one_layer=True)
    return stack.push(image.built, unique_name(f"test/cli-{name}")).reference


HELP = [
    ["--help"],
    *([name, "--help"] for name in ("serve", "index", "pull", "accel", "status")),
    ["index", "build", "--help"],
    ["index", "show", "--help"],
    ["accel", "serve", "--help"],
]


def test_every_subcommand_stops_quietly_when_its_reader_goes_away(stack: LazyStack) -> None:
    for words in HELP:  # argparse writes help itself (it ignores the write error): exit 0
        assert_quiet(into_closed_pipe(*words), printed=False)
    root = str(stack.daemon.root)
    assert_quiet(into_closed_pipe("status", "--root", root))
    assert_quiet(into_closed_pipe("status", "--root", root, "--json"))

    indexed = push_data_image(stack, "shown")
    stack.index_build(indexed)
    assert_quiet(into_closed_pipe("index", "show", "--plain-http", indexed))
    assert_quiet(into_closed_pipe("index", "show", "--plain-http", "--json", indexed))
    fresh = push_data_image(stack, "built")
    assert_quiet(into_closed_pipe("index", "build", "--plain-http", "--min-layer-size", "0", fresh))
    common = [
        "--address",
        str(stack.containerd.address),
        "--namespace",
        stack.namespace,
        "--hosts-dir",
        str(stack.containerd.hosts_dir),
    ]
    through_daemon = ["--daemon-address", str(stack.daemon.socket)]
    own_process = ["--no-daemon", "--daemon-config", str(stack.daemon.config)]
    for where, name in ((through_daemon, "daemon-pull"), (own_process, "own-pull")):
        assert_quiet(into_closed_pipe("pull", *where, *common, push_data_image(stack, name)))
    # Still serving: the daemon's pull for a client that went away just stopped.
    pulled = stack.pull(push_data_image(stack, "after"))
    assert pulled.pulled == 1, pulled.stdout


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _names_once(line: str, reference: str) -> None:
    repository = Reference.parse(reference).repository.name
    assert line.count(repository) == 1, line
    assert ABSENT in line, line


def _platform_errors(stack: LazyStack, reference: str) -> list[str]:
    pull = stack.lazysnap(
        "pull",
        "--daemon-address",
        str(stack.daemon.socket),
        "--address",
        str(stack.containerd.address),
        "--namespace",
        stack.namespace,
        "--hosts-dir",
        str(stack.containerd.hosts_dir),
        "--platform",
        ABSENT,
        reference,
        check=False,
    )
    build = stack.lazysnap(
        "index", "build", "--plain-http", "--platform", ABSENT, reference, check=False
    )
    show = stack.lazysnap(
        "index", "show", "--plain-http", "--platform", ABSENT, reference, check=False
    )
    return [_error_line(result) for result in (pull, build, show)]


def test_a_platform_a_single_platform_image_lacks_is_an_error_everywhere(
    stack: LazyStack,
) -> None:
    if Platform.host().architecture != "amd64":
        pytest.skip("the test images are linux/amd64")
    reference = push_data_image(stack, "single")
    for line in _platform_errors(stack, reference):
        _names_once(line, reference)
        assert "single-platform manifest for linux/amd64" in line, line
    # The platform it has still works.
    assert "pushed" in stack.index_build(reference, "--platform", "linux/amd64")


def test_a_platform_an_index_lacks_is_an_error_naming_the_image_once(
    stack: LazyStack,
) -> None:
    single = push_data_image(stack, "multi")
    repository = Reference.parse(single).repository
    manifest_digest = _manifest_digest(stack, single)
    entry = Descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        manifest_digest[0],
        manifest_digest[1],
        platform=Platform("linux", "amd64"),
    )
    with RegistryClient(HostsConfig(plain_http=[stack.registry.host])) as client:
        client.push_manifest(repository, "multi", build_index([entry]), OCI_INDEX)
    reference = single.rsplit(":", 1)[0] + ":multi"
    for line in _platform_errors(stack, reference):
        _names_once(line, reference)
        assert "linux/amd64" in line, line  # says what the image offers


def _manifest_digest(stack: LazyStack, reference: str) -> tuple[str, int]:
    with RegistryClient(HostsConfig(plain_http=[stack.registry.host])) as client:
        manifest = client.get_manifest(Reference.parse(reference))
    return manifest.digest, len(manifest.data)
