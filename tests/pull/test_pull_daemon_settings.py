"""When `lazysnap pull` warns that the daemon's registry settings lack its own (the stack test
tests/lazy/test_lazy_pull_settings.py shows the warnings reach the user): only where the daemon
would really fail to reach the registry as the pull does."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

from snapshotter.config import RemoteConfig
from snapshotter.pull.daemon_settings import daemon_setting_warnings
from snapshotter.pull.request import PullRequest

REGISTRY = "reg.example:5000"


def request(tmp_path: Path, **changes: Any) -> PullRequest:
    base = PullRequest(
        image=f"{REGISTRY}/app:1",
        address="/run/containerd/containerd.sock",
        namespace="default",
        snapshotter="lazysnap",
        docker_config=str(tmp_path / "absent.json"),
    )
    return dataclasses.replace(base, **changes)


def docker_config(path: Path, *hosts: str) -> str:
    auth = base64.b64encode(b"u:p").decode()
    path.write_text(json.dumps({"auths": {h: {"auth": auth} for h in hosts}}))
    return str(path)


def test_plain_http_is_warned_only_where_the_daemon_speaks_https(tmp_path: Path) -> None:
    none = str(tmp_path / "none.json")
    pull = request(tmp_path, plain_http=True)
    [warning] = daemon_setting_warnings(pull, RemoteConfig(hosts_dir=str(tmp_path)), none)
    assert f'add "{REGISTRY}" to plain_http under [remote]' in warning
    listed = RemoteConfig(hosts_dir=str(tmp_path), plain_http=(REGISTRY,))
    assert daemon_setting_warnings(pull, listed, none) == []
    (tmp_path / REGISTRY).mkdir()
    (tmp_path / REGISTRY / "hosts.toml").write_text(f'server = "http://{REGISTRY}"\n')
    assert daemon_setting_warnings(pull, RemoteConfig(hosts_dir=str(tmp_path)), none) == []
    # Nothing lazy is at stake: no warning.
    overlay = request(tmp_path, plain_http=True, snapshotter="overlayfs")
    assert daemon_setting_warnings(overlay, RemoteConfig(), none) == []
    assert daemon_setting_warnings(pull, RemoteConfig(enable=False), none) == []


def test_credentials_are_warned_only_when_the_daemon_has_none_for_the_registry(
    tmp_path: Path,
) -> None:
    mine = docker_config(tmp_path / "mine.json", REGISTRY)
    pull = request(tmp_path, docker_config=mine)
    daemons = docker_config(tmp_path / "daemon.json", "other.example")
    [warning] = daemon_setting_warnings(pull, RemoteConfig(plain_http=(REGISTRY,)), daemons)
    assert f"your credentials for {REGISTRY}" in warning and daemons in warning
    assert "u:p" not in warning
    shared = docker_config(tmp_path / "shared.json", REGISTRY)
    named = RemoteConfig(plain_http=(REGISTRY,), docker_config=shared)
    assert daemon_setting_warnings(pull, named, daemons) == []  # [remote] docker_config wins
    anonymous = request(tmp_path)  # the pull has none: nothing to lose
    assert daemon_setting_warnings(anonymous, RemoteConfig(plain_http=(REGISTRY,)), daemons) == []
