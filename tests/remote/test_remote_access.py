"""RegistryAccess: the one value every registry client and Range reader is built from, and that
a mount process's spec carries (so a lazy layer is read as the daemon found it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.fs.blob_source import BlobSpec, BlobSpecError
from snapshotter.remote.access import AccessSpecError, RegistryAccess
from snapshotter.remote.credentials import Credentials


def test_an_unnamed_docker_config_is_this_process_default_made_explicit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text('{"auths": {"reg.example:5000": {"auth": "dTpw"}}}')
    access = RegistryAccess.create(hosts_dir=None, plain_http=["reg.example:5000"])
    assert access.docker_config == str(tmp_path / "config.json")
    # the same file and host settings reach a process that has another environment
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "elsewhere"))
    carried = RegistryAccess.from_json(json.loads(json.dumps(access.to_json())))
    assert carried == access
    with carried.client() as client:
        assert client.credentials.get("reg.example:5000") == Credentials("u", "p")
        [host] = client.hosts.hosts_for("reg.example:5000", "pull")
        assert host.url == "http://reg.example:5000"


def test_a_missing_docker_config_means_anonymous_access(tmp_path: Path) -> None:
    access = RegistryAccess.create(docker_config=str(tmp_path / "absent.json"))
    assert access.credentials().get("reg.example") is None
    assert RegistryAccess().credentials().get("reg.example") is None  # "" : anonymous


def test_a_mount_spec_carries_the_access_whole() -> None:
    access = RegistryAccess("/etc/hosts.d", ("reg:5000",), "/root/config.json", 12.5, 1)
    spec = BlobSpec("registry", "reg:5000/app", "sha256:" + "a" * 64, 10, access)
    assert BlobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize(
    ("access", "message"),
    [
        ({"plain_http": "reg:5000"}, "blob.access.plain_http: not a list"),
        ({"docker_config": 1}, "blob.access.docker_config: not a string"),
        ({"timeout": 0}, "blob.access.timeout: 0 is not a positive number"),
        ({"retries": -1}, "blob.access.retries: -1 is not a count"),
        ({"token": "x"}, r"blob.access: unknown keys \['token'\]"),
    ],
)
def test_a_bad_access_in_a_spec_is_an_error_naming_the_key(
    access: dict[str, object], message: str
) -> None:
    spec = {"kind": "registry", "location": "reg:5000/app", "digest": "sha256:" + "a" * 64}
    with pytest.raises(BlobSpecError, match=message):
        BlobSpec.from_json({**spec, "size": 10, "access": access})


def test_a_spec_with_the_old_flat_access_keys_is_refused_naming_them() -> None:
    # Silently ignored, plain_http would send the reads over https, and fail, or worse.
    spec = {"kind": "registry", "location": "reg:5000/app", "digest": "sha256:" + "a" * 64}
    with pytest.raises(BlobSpecError, match=r"blob: unknown keys \['plain_http'\]"):
        BlobSpec.from_json({**spec, "size": 10, "plain_http": ["reg:5000"]})


def test_access_errors_are_value_errors_naming_the_value() -> None:
    with pytest.raises(AccessSpecError, match="access: expected an object, got list"):
        RegistryAccess.from_json([])
