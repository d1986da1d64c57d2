"""The [fetch] keys of config.toml reach the lazy layers, and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.config import ConfigError, load_config
from snapshotter.fs.reader import DEFAULT_READ_AHEAD_SPANS, DEFAULT_READ_AROUND_SCOPE
from snapshotter.lazylayers.settings import LazyLayerSettings


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_fetch_keys_reach_the_lazy_layers(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            "[fetch]\nprefetch = false\nbackground = false\n"
            "background_quiet_seconds = 1.5\nbackground_rate_bytes = 1048576\n"
            "read_ahead_spans = 3\nread_around_bytes = 524288\nread_around_scope = 'file'\n",
        )
    )
    layers = LazyLayerSettings.from_config(config)
    assert layers.prefetch is False
    assert layers.background.enabled is False
    assert layers.background.quiet_seconds == 1.5
    assert layers.background.rate_bytes == 1 << 20
    assert layers.read_ahead_spans == 3
    assert (layers.read_around_bytes, layers.read_around_scope) == (512 << 10, "file")


def test_defaults_fetch_in_the_background() -> None:
    layers = LazyLayerSettings.from_config(load_config(None))
    assert layers.prefetch and layers.background.enabled
    assert layers.background.quiet_seconds > 0 and layers.background.rate_bytes > 0
    assert layers.read_ahead_spans == DEFAULT_READ_AHEAD_SPANS  # config's copy of the default
    assert layers.read_around_bytes == 0  # read-around off
    assert layers.read_around_scope == DEFAULT_READ_AROUND_SCOPE


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[fetch]\nbackground_rate_bytes = 0\n", "fetch.background_rate_bytes"),
        ("[fetch]\nbackground_quiet_seconds = -1\n", "fetch.background_quiet_seconds"),
        ("[fetch]\nbackground = 'yes'\n", "fetch.background"),
        ("[fetch]\nread_ahead_spans = -1\n", "fetch.read_ahead_spans"),
        ("[fetch]\nbackgrund = true\n", "fetch.backgrund"),
        ("[fetch]\nread_around_bytes = -1\n", "fetch.read_around_bytes"),
        ("[fetch]\nread_around_bytes = 1073741824\n", "fetch.read_around_bytes"),
        ("[fetch]\nread_around_scope = 'tree'\n", "fetch.read_around_scope"),
    ],
)
def test_bad_fetch_values_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(_write(tmp_path, text))
