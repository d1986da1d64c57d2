"""A hosts.toml edited while `lazysnap serve` runs is used by its next index discovery, without
a restart (containerd reads hosts.toml per pull; the daemon now does the same).

The image is named by an address where nothing listens; the puller's own hosts dir routes that
name to the session registry. The daemon reads containerd's hosts dir, which first has no entry
for the name (its discovery gets "connection refused": the layer is pulled whole); then a
mirror for it is added there, and the next pull of the same image is lazy."""

from __future__ import annotations

import contextlib

import pytest

from harness.procs import free_port
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack


def test_a_mirror_added_while_serve_runs_is_used_by_the_next_discovery(stack: LazyStack) -> None:
    gone = f"127.0.0.1:{free_port()}"
    puller_hosts = stack.workdir / "puller-hosts"
    (puller_hosts / gone).mkdir(parents=True)
    (puller_hosts / gone / "hosts.toml").write_text(f'server = "http://{stack.registry.host}"\n')
    image = build_data_image(stack.workdir / "mirror", {"hello": 1000}, one_layer=True)
    repository = unique_name("test/lazy-mirror")
    stack.push(image.built, repository)
    reference = f"{gone}/{repository}:latest"
    built = stack.index_build(reference, "--hosts-dir", str(puller_hosts))
    assert ": pushed sha256:" in built, built

    before = stack.pull(reference, hosts_dir=puller_hosts)
    assert (before.lazy, before.pulled) == (0, 1), before.stdout
    assert "(not lazy: registry: " in before.stdout and "Connection refused" in before.stdout

    daemon_hosts = stack.containerd.hosts_dir / gone
    daemon_hosts.mkdir()
    other_namespace = unique_name("lzs-lazy")
    try:
        (daemon_hosts / "hosts.toml").write_text(
            f'server = "http://{gone}"\n'
            f'[host."http://{stack.registry.host}"]\n'
            'capabilities = ["pull", "resolve"]\n'
        )
        offset = stack.daemon_log_offset()
        after = stack.lazysnap(
            "pull",
            "--daemon-address",
            str(stack.daemon.socket),
            "--address",
            str(stack.containerd.address),
            "--namespace",
            other_namespace,
            "--hosts-dir",
            str(puller_hosts),
            reference,
        )
        assert "(1 lazy, 0 pulled" in after.stdout, after.stdout + stack.daemon_log_since(offset)
    finally:
        (daemon_hosts / "hosts.toml").unlink()
        daemon_hosts.rmdir()
        with contextlib.suppress(Exception):
            remove_namespace_content(stack.containerd, other_namespace)
