"""containerd hosts.toml: mirrors in order then the server, capabilities, TLS, headers,
plain-http override; bad files give errors naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.remote.errors import HostsConfigError
from snapshotter.remote.hosts import HostsConfig


def write(hosts_dir: Path, registry: str, text: str) -> Path:
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = HostsConfig(tmp_path, plain_http=["127.0.0.1:5000"])
    [hub] = config.hosts_for("docker.io", "pull")
    assert hub.url == "https://registry-1.docker.io"
    assert hub.api_url("/library/busybox/manifests/latest") == (
        "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
    )
    [local] = config.hosts_for("127.0.0.1:5000", "push")
    assert local.url == "http://127.0.0.1:5000"
    assert HostsConfig().hosts_for("ghcr.io", "resolve")[0].url == "https://ghcr.io"


def test_mirrors_then_server_with_capabilities_tls_and_headers(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    write(
        tmp_path,
        "registry.example.com",
        f"""
server = "https://registry.example.com"
[host."https://mirror-a.example.com"]
  capabilities = ["pull", "resolve"]
  ca = "{ca}"
  [host."https://mirror-a.example.com".header]
    x-team = ["one", "two"]
[host."http://mirror-b.example.com:8080"]
  capabilities = ["pull"]
  skip_verify = true
""",
    )
    config = HostsConfig(tmp_path)
    pull = config.hosts_for("registry.example.com", "pull")
    assert [h.url for h in pull] == [
        "https://mirror-a.example.com",
        "http://mirror-b.example.com:8080",
        "https://registry.example.com",
    ]
    assert pull[0].ca == (str(ca),)
    assert pull[0].headers == (("x-team", "one"), ("x-team", "two"))
    assert pull[1].skip_verify and pull[1].host == "mirror-b.example.com:8080"
    assert [h.url for h in config.hosts_for("registry.example.com", "resolve")] == [
        "https://mirror-a.example.com",
        "https://registry.example.com",
    ]
    assert [h.url for h in config.hosts_for("registry.example.com", "push")] == [
        "https://registry.example.com"
    ]


def test_plain_http_overrides_the_server_scheme(tmp_path: Path) -> None:
    write(tmp_path, "10.0.0.1:5000", 'server = "https://10.0.0.1:5000"\n')
    assert (
        HostsConfig(tmp_path).hosts_for("10.0.0.1:5000", "pull")[0].url == "https://10.0.0.1:5000"
    )
    plain = HostsConfig(tmp_path, plain_http=["10.0.0.1:5000"])
    assert plain.hosts_for("10.0.0.1:5000", "pull")[0].url == "http://10.0.0.1:5000"


def test_default_dir_applies_to_unlisted_registries(tmp_path: Path) -> None:
    write(tmp_path, "_default", '[host."https://mirror.internal"]\n  capabilities = ["pull"]\n')
    urls = [h.url for h in HostsConfig(tmp_path).hosts_for("quay.io", "pull")]
    assert urls == ["https://mirror.internal", "https://quay.io"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [1", "cannot read hosts file"),
        ("server = 5", "'server' must be a string"),
        ('[host."ftp://x"]\n', "invalid host URL"),
        ('[host."https://m"]\n  skip_verify = "yes"\n', "skip_verify"),
        ('[host."https://m"]\n  ca = "/nonexistent/ca.pem"\n', "CA file /nonexistent/ca.pem"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "r.example", text)
    with pytest.raises(HostsConfigError) as info:
        HostsConfig(tmp_path).hosts_for("r.example", "pull")
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_changed_hosts_file_is_read_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    """A daemon sees a mirror added (or a file removed) at its next lookup, as containerd does
    per pull; an unchanged file is not parsed again (its parse is reused)."""
    config = HostsConfig(tmp_path)
    [server] = config.hosts_for("reg.example:5000", "pull")
    assert server.url == "https://reg.example:5000"
    path = write(tmp_path, "reg.example:5000", 'server = "http://reg.example:5000"\n')
    assert [h.url for h in config.hosts_for("reg.example:5000", "pull")] == [
        "http://reg.example:5000"
    ]
    first = config.hosts_for("reg.example:5000", "pull")
    assert config.hosts_for("reg.example:5000", "pull")[0] is first[0]  # not parsed again
    # An edit in place that keeps the size: the mtime tells (set apart explicitly, as two
    # writes within one timestamp tick would otherwise look alike).
    path.write_text(
        'server = "http://reg.example:5000"\n[host."http://mirror.example"]\n'
        'capabilities = ["pull"]\n'
    )
    assert [h.url for h in config.hosts_for("reg.example:5000", "pull")] == [
        "http://mirror.example",
        "http://reg.example:5000",
    ]
    stat = path.stat()
    same_size = path.read_text().replace("mirror.example", "mirror.exampl2")
    path.write_text(same_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert config.hosts_for("reg.example:5000", "pull")[0].url == "http://mirror.exampl2"
    path.unlink()
    assert config.hosts_for("reg.example:5000", "pull")[0].url == "https://reg.example:5000"
