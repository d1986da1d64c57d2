"""`lazysnap pull --plain-http` and the caller's credentials reach only the pull's own requests:
the daemon reads lazy layers with its own registry settings (docs/containerd.md says why). Where
they differ, the pull warns before it starts, naming the config key to set, and each layer
pulled whole says why: never a silent full pull.

The session registry is reached here under a second name, `localhost:<port>`, that the
daemon's config does not list in [remote] plain_http (it lists `127.0.0.1:<port>`): the same
registry and index, as a registry the daemon does not know to be plain http."""

from __future__ import annotations

import base64
import json

import pytest

from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("through_daemon", [True, False], ids=["daemon", "own-process"])
def test_plain_http_and_credentials_the_daemon_lacks_are_warned_and_each_layer_says_why(
    stack: LazyStack, through_daemon: bool
) -> None:
    image = build_data_image(stack.workdir / "plain", {"hello": 1000}, one_layer=True)
    pushed = stack.push(image.built, unique_name("test/lazy-plain"))
    built = stack.index_build(pushed.reference)
    assert ": pushed sha256:" in built, built  # the index exists: only the route is missing
    registry = stack.registry.host
    assert registry.startswith("127.0.0.1:"), registry
    alias = "localhost:" + registry.split(":", 1)[1]
    reference = pushed.reference.replace(registry, alias, 1)
    no_hosts = stack.workdir / "no-hosts"  # the pull reaches the alias by --plain-http alone
    no_hosts.mkdir()
    docker = stack.workdir / "docker"
    docker.mkdir()
    auth = base64.b64encode(b"someone:secret").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {alias: {"auth": auth}}}))
    where = (
        ["--daemon-address", str(stack.daemon.socket)]
        if through_daemon
        else ["--no-daemon", "--daemon-config", str(stack.daemon.config)]
    )
    result = stack.lazysnap(
        "pull",
        *where,
        "--plain-http",
        "--hosts-dir",
        str(no_hosts),
        "--address",
        str(stack.containerd.address),
        "--namespace",
        stack.namespace,
        reference,
        env={"DOCKER_CONFIG": str(docker)},
    )
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2, result.stderr
    plain, credentials = warnings
    assert "--plain-http applies to this pull's own requests only" in plain, plain
    assert f'add "{alias}" to plain_http under [remote]' in plain, plain
    assert f"your credentials for {alias} apply to this pull's own requests only" in credentials
    assert "docker_config under [remote]" in credentials, credentials
    assert "secret" not in result.stderr and auth not in result.stderr
    assert "(0 lazy, 1 pulled" in result.stdout, result.stdout
    [layer] = [line for line in result.stdout.splitlines() if line.startswith("layer 1/1")]
    assert "pulled" in layer and "(not lazy: registry: " in layer, layer
    assert f"https://{alias}/" in layer, layer  # the daemon spoke https to it

    # The same image through the name the daemon knows is plain http: lazy, no warning.
    again = stack.lazysnap(
        "pull",
        *where,
        "--plain-http",
        "--address",
        str(stack.containerd.address),
        "--namespace",
        unique_name("lzs-lazy"),
        pushed.reference,
    )
    assert "warning:" not in again.stderr, again.stderr
