from pathlib import Path

import pytest

from snapshotter.config import load_config
from snapshotter.source.discover import IndexDiscovery
from snapshotter.source.factory import lazy_layers_from_config


def test_mount_processes_get_the_same_default_credentials_file_as_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: with docker_config unset, discovery read ~/.docker/config.json but layer
    # reads went out anonymously, so every read of a private layer failed with EIO.
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text('{"auths": {"reg.example:5000": {"auth": "dTpw"}}}')
    layers = lazy_layers_from_config(load_config(None, root=str(tmp_path / "root")))
    layers.close()  # its zygote: only the settings are looked at
    assert isinstance(layers.resolve, IndexDiscovery)
    assert layers.resolve.access.docker_config == str(tmp_path / "config.json")
    assert layers.resolve.client.credentials.get("reg.example:5000") is not None
