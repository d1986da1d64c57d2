"""config.py and the `lazysnap` command line: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.cli import build_parser
from snapshotter.config import Config, ConfigError, _ranges, load_config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_defaults_work_without_a_file() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.remote.enable is True
    assert config.remote.min_layer_size == 10 << 20
    assert config.remote.fetch_timeout_seconds == 30
    assert config.cache.max_size_bytes == 10 << 30
    assert config.cache_dir == "/var/lib/lazysnap/cache"
    assert config.metrics.address == ""


def test_every_documented_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
root = "/srv/lazysnap"
address = "/run/x.sock"
log_level = "debug"
[remote]
enable = false
hosts_dir = "/etc/hosts.d"
docker_config = "/root/.docker/config.json"
plain_http = ["127.0.0.1:5000", "registry.local"]
fetch_timeout_seconds = 5
min_layer_size = 0
[cache]
max_size_bytes = 1024
[fuse]
read_ahead_kb = 128
[metrics]
address = "127.0.0.1:9100"
""",
    )
    config = load_config(path)
    assert (config.root, config.address, config.log_level) == (
        "/srv/lazysnap",
        "/run/x.sock",
        "debug",
    )
    assert config.remote.enable is False
    assert config.remote.plain_http == ("127.0.0.1:5000", "registry.local")
    assert config.remote.fetch_timeout_seconds == 5.0
    assert config.cache_dir == "/srv/lazysnap/cache"
    assert config.cache.max_size_bytes == 1024
    assert config.fuse.read_ahead_kb == 128
    assert config.metrics.address == "127.0.0.1:9100"
    # Documented means documented: every key appears in docs/configuration.md.
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for key in ("root", "address", "log_level", "enable", "hosts_dir", "docker_config",
                "plain_http", "fetch_timeout_seconds", "min_layer_size", "dir",
                "max_size_bytes", "read_ahead_kb"):  # fmt: skip
        assert f"`{key}`" in doc, key


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'root = "/from/file"\nlog_level = "error"\n')
    config = load_config(path, root="/from/flag", address=None, log_level=None)
    assert config.root == "/from/flag" and config.log_level == "error"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("roots = '/x'", "'roots'"),
        ("[remote]\nenabled = true", "'remote.enabled'"),
        ("[remote]\nenable = 'yes'", "remote.enable must be a boolean"),
        ("[remote]\nplain_http = 'host'", "remote.plain_http must be a list of strings"),
        ("[cache]\nmax_size_bytes = true", "cache.max_size_bytes must be an integer"),
        ("[cache]\nmax_size_bytes = -1", "cache.max_size_bytes must be between 1 and"),
        ("remote = 3", "[remote] must be a table"),
        ("log_level = 'loud'", "log_level must be one of"),
        ("root = ''", "root must not be empty"),
        ("root = ", "invalid TOML"),
    ],
)
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert named in str(raised.value) and path in str(raised.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        # issue 12: accepted before, and written to the bdi's read_ahead_kb
        ("[fuse]\nread_ahead_kb = 99999999999999999999", "fuse.read_ahead_kb must be between 0 "
         "and 1048576, got 99999999999999999999"),
        ("[fuse]\nread_ahead_kb = 9999999999999", "fuse.read_ahead_kb must be between 0 and "
         "1048576, got 9999999999999"),
        ("[remote]\nfetch_timeout_seconds = 0", "remote.fetch_timeout_seconds must be between "
         "0.1 and 3600.0, got 0.0"),
        ("[remote]\nfetch_timeout_seconds = nan", "remote.fetch_timeout_seconds must be between"),
        ("[remote]\nfetch_timeout_seconds = inf", "got inf"),
        ("[remote]\nmin_layer_size = -5", "remote.min_layer_size must be between 0 and"),
        ("[cache]\nmax_size_bytes = 1e30", "cache.max_size_bytes must be an integer"),
        ("[cache]\nmax_size_bytes = 2251799813685249", "cache.max_size_bytes must be between"),
        ("[cache]\nmax_size_bytes = 0", "cache.max_size_bytes must be between 1 and"),
        ("[fetch]\nbackground_quiet_seconds = 1e9", "fetch.background_quiet_seconds must be "
         "between 0.0 and 86400.0"),
        ("[fetch]\nbackground_rate_bytes = 0", "fetch.background_rate_bytes must be between 1"),
        ("[fetch]\nread_ahead_spans = 100000", "fetch.read_ahead_spans must be between 0 and 256"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_name_the_key_and_the_range(
    tmp_path: Path, text: str, named: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert named in str(raised.value) and path in str(raised.value)


def test_every_numeric_key_has_a_documented_range() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for key, _, _, _ in _ranges(load_config(None)):
        name = key.split(".")[1]
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}`"))
        assert "Allowed:" in row, key


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: not found"):
        load_config(str(tmp_path / "nope.toml"))


def test_serve_flags_parse_and_unknown_commands_fail() -> None:
    args = build_parser().parse_args(
        ["serve", "--root", "/r", "--address", "/s", "--log-level", "debug"]
    )
    assert (args.root, args.address, args.log_level, args.config) == ("/r", "/s", "debug", None)
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "frobnicate"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_serve_does_not_import_fuse_or_http_code_when_remote_is_off(tmp_path: Path) -> None:
    # What `lazysnap serve` loads before it listens, minus the daemon loop itself.
    probe = (
        "import sys; from snapshotter.config import load_config;"
        "from snapshotter.service import daemon; import snapshotter.service.grpc_service;"
        "import snapshotter.core.snapshotter; from snapshotter.cli import build_parser;"
        "c = load_config(sys.argv[1]); assert daemon.load_remote_layers(c) is None;"
        "heavy = [m for m in ('mfusepy', 'httpx', 'urllib3', 'zstandard', 'indexed_gzip',"
        " 'snapshotter.fs', 'snapshotter.lazylayers', 'snapshotter.remote', 'snapshotter.index')"
        " if m in sys.modules];"
        "print(heavy)"
    )
    path = write(tmp_path, "[remote]\nenable = false\n")
    result = subprocess.run(
        [sys.executable, "-c", probe, path], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("value", ["5", "32k", "65M", "0"])
@pytest.mark.parametrize("command", [["index", "build"], ["accel", "serve"]])
def test_span_size_out_of_range_stops_the_command_before_any_work(
    command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # an image on a host that does not exist: parsing must refuse before anything resolves it
    extra = ["registry.invalid/app:1"] if command[0] == "index" else []
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--span-size", value, *extra])
    assert exited.value.code == 2
    assert f"span size {value!r} is outside [65536, 67108864] bytes" in capsys.readouterr().err


def test_span_size_limits_are_accepted() -> None:
    for value, size in (("64k", 64 << 10), ("64M", 64 << 20), ("1M", 1 << 20)):
        args = build_parser().parse_args(["index", "build", "--span-size", value, "r/a:1"])
        assert args.span_size == size


def test_file_cut_minimum_is_parsed_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["index", "build", "--file-cut-min", "64K", "r/a:1"])
    assert args.file_cut_min == 64 << 10
    assert build_parser().parse_args(["index", "build", "r/a:1"]).file_cut_min == 0
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["index", "build", "--file-cut-min", "65M", "r/a:1"])
    assert exited.value.code == 2
    assert "file cut minimum '65M' is larger than the largest span size" in capsys.readouterr().err
