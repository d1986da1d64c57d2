"""lazysnap's TOML configuration -> frozen dataclasses, with defaults that work.

Every key is documented in docs/configuration.md. Unknown keys and wrongly typed values are
errors that name the key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshotter.log import LOG_LEVELS

DEFAULT_ROOT = "/var/lib/lazysnap"
DEFAULT_ADDRESS = "/run/lazysnap/lazysnap.sock"
DEFAULT_CONFIG_PATH = "/etc/lazysnap/config.toml"


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


@dataclass(frozen=True)
class RemoteConfig:
    enable: bool = True  # serve layers lazily when an index exists; False = plain overlay only
    hosts_dir: str = "/etc/containerd/certs.d"  # containerd hosts.toml tree (mirrors, TLS)
    docker_config: str = ""  # path to a docker config.json with registry credentials
    plain_http: tuple[str, ...] = ()  # registry hosts ("host:port") reached over http://
    fetch_timeout_seconds: float = 30.0
    min_layer_size: int = 10 << 20  # smaller layers are pulled whole: laziness would not pay


@dataclass(frozen=True)
class CacheConfig:
    dir: str = ""  # "" = ROOT/cache
    max_size_bytes: int = 10 << 30
    # Free space the cache leaves on its filesystem: the larger of the two (at most half the
    # filesystem); fs.disk_reserve.DiskReserve's defaults (not imported: keeps config light).
    min_free_bytes: int = 1 << 30
    min_free_percent: float = 5.0


@dataclass(frozen=True)
class FuseConfig:
    read_ahead_kb: int = 4096  # per-mount bdi read_ahead_kb: 4096 gives 1 MiB FUSE reads
    # ... while the layer's start goes on (until its background fetch starts): at 4 MiB a page
    # fault in a shared object reads most of the file (docs/benchmarks.md, "Span layouts")
    start_read_ahead_kb: int = 128
    # Fork mount processes from a pre-started process that imported their code (fs/zygote.py).
    zygote: bool = True
    # Written to each mount process's /proc/PID/oom_score_adj: its death strands every container
    # reading the layer (docs/how-it-works.md), so the OOM killer should pick them first.
    oom_score_adj: int = -500


@dataclass(frozen=True)
class FetchConfig:
    prefetch: bool = True  # fetch the startup profile's files right after mounting
    background: bool = True  # fetch the rest of each lazy layer once it is quiet
    background_quiet_seconds: float = 5.0  # no on-demand fetch for this long before starting
    background_rate_bytes: int = 32 << 20  # compressed bytes per second per layer
    # Once background fetch has a whole layer, copy it to plain files and detach its FUSE mount.
    materialize: bool = True
    # Largest window, in spans, fetched ahead of a file read forward span by span; 0: off.
    read_ahead_spans: int = (
        8  # fs.reader.DEFAULT_READ_AHEAD_SPANS (not imported: keeps config light)
    )
    # Compressed bytes of spans after a read's missing ones fetched in its request; 0: off.
    read_around_bytes: int = 0
    read_around_scope: str = "directory"  # or "file": how far read-around may go


@dataclass(frozen=True)
class TrustConfig:
    # "signed": only indexes signed by one of public_keys; "permissive": any index (unsigned too)
    mode: str = "signed"
    public_keys: tuple[str, ...] = ()  # PEM public key files, or directories of *.pub files


TRUST_MODES = ("signed", "permissive")


@dataclass(frozen=True)
class MetricsConfig:
    address: str = ""  # "host:port" for Prometheus metrics; "" = off
    # The endpoint has no authentication: an address other than loopback must be asked for.
    allow_non_loopback: bool = False


@dataclass(frozen=True)
class CriConfig:
    # The CRI image service kubelet talks to (--image-service-endpoint); "" = off. Every call
    # is forwarded to containerd_cri_socket; a PullImage's credentials are kept in memory.
    image_service_socket: str = ""
    containerd_cri_socket: str = "/run/containerd/containerd.sock"
    credential_ttl_seconds: float = 3600.0  # how long an image's pull credentials are kept


@dataclass(frozen=True)
class Config:
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    log_level: str = "info"
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    cri: CriConfig = field(default_factory=CriConfig)

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or os.path.join(self.root, "cache")


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _convert(value: Any, want: Any, key: str, source: str) -> Any:
    """value as type want, or ConfigError naming key and source."""
    if dataclasses.is_dataclass(want) and isinstance(want, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table, got {type(value).__name__}")
        return _build(want, value, key + ".", source)
    if typing.get_origin(want) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of strings")
        return tuple(value)
    # bool is an int in Python; TOML keeps them apart and so do we.
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_TYPE_NAMES.get(want, want)}, got {value!r}")
    return value


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            raise ConfigError(f"{source}: unknown key {prefix + key!r}")
    values = {k: _convert(v, hints[k], prefix + k, source) for k, v in table.items()}
    return cls(**values)


# Allowed ranges of the numeric keys (docs/configuration.md lists them): wide enough for any
# real setup, narrow enough that a typo (an extra digit, a unit mix-up) is an error, not a
# value the kernel or the fetch loop would choke on.
MAX_BYTES = 1 << 50  # 1 PiB
MAX_SECONDS = 86400.0
MAX_READ_AHEAD_KB = 1 << 20  # 1 GiB of kernel read-ahead per mount
MAX_READ_AHEAD_SPANS = 256
MAX_READ_AROUND_BYTES = 32 << 20  # fs.span_fetch.MAX_COALESCED_BYTES: one request's cap
READ_AROUND_SCOPES = ("file", "directory")  # fs.read_ahead.READ_AROUND_SCOPES


def _ranges(config: Config) -> tuple[tuple[str, float, float, float], ...]:
    """(key, value, lowest, highest allowed) of every numeric key."""
    return (
        ("remote.fetch_timeout_seconds", config.remote.fetch_timeout_seconds, 0.1, 3600.0),
        ("remote.min_layer_size", config.remote.min_layer_size, 0, MAX_BYTES),
        ("cache.max_size_bytes", config.cache.max_size_bytes, 1, MAX_BYTES),  # the cache needs > 0
        ("cache.min_free_bytes", config.cache.min_free_bytes, 0, MAX_BYTES),
        ("cache.min_free_percent", config.cache.min_free_percent, 0.0, 50.0),
        ("fuse.oom_score_adj", config.fuse.oom_score_adj, -1000, 1000),
        ("fuse.read_ahead_kb", config.fuse.read_ahead_kb, 0, MAX_READ_AHEAD_KB),
        ("fuse.start_read_ahead_kb", config.fuse.start_read_ahead_kb, 1, MAX_READ_AHEAD_KB),
        ("fetch.background_quiet_seconds", config.fetch.background_quiet_seconds, 0.0,
         MAX_SECONDS),
        ("fetch.background_rate_bytes", config.fetch.background_rate_bytes, 1, MAX_BYTES),
        ("fetch.read_ahead_spans", config.fetch.read_ahead_spans, 0, MAX_READ_AHEAD_SPANS),
        ("fetch.read_around_bytes", config.fetch.read_around_bytes, 0, MAX_READ_AROUND_BYTES),
        ("cri.credential_ttl_seconds", config.cri.credential_ttl_seconds, 1.0, MAX_SECONDS),
    )  # fmt: skip


def _validate(config: Config, source: str) -> Config:
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{source}: log_level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}"
        )
    if config.fetch.read_around_scope not in READ_AROUND_SCOPES:
        raise ConfigError(
            f"{source}: fetch.read_around_scope must be one of {', '.join(READ_AROUND_SCOPES)}, "
            f"got {config.fetch.read_around_scope!r}"
        )
    for key, value, low, high in _ranges(config):
        # not (low <= value <= high) also refuses TOML's nan; inf is out of every range
        if not low <= value <= high:
            raise ConfigError(f"{source}: {key} must be between {low} and {high}, got {value}")
    _validate_trust(config.trust, source)
    for name, text in (("root", config.root), ("address", config.address)):
        if not text:
            raise ConfigError(f"{source}: {name} must not be empty")
    if config.cri.image_service_socket and not config.cri.containerd_cri_socket:
        raise ConfigError(
            f"{source}: cri.containerd_cri_socket must not be empty when "
            "cri.image_service_socket is set (the proxy forwards every call there)"
        )
    return config


def _validate_trust(trust: TrustConfig, source: str) -> None:
    if trust.mode not in TRUST_MODES:
        raise ConfigError(
            f"{source}: trust.mode must be one of {', '.join(TRUST_MODES)}, got {trust.mode!r}"
        )
    if trust.public_keys:
        # Read now, so a missing or wrong key stops the daemon at start naming the file, not
        # later as every layer falling back. (Imported here: cryptography is not light.)
        from snapshotter.trust.keys import TrustKeyError, load_public_keys

        try:
            load_public_keys(trust.public_keys)
        except TrustKeyError as exc:
            raise ConfigError(f"{source}: trust.public_keys: {exc}") from None


def load_config(path: str | None = None, **overrides: Any) -> Config:
    """Read path (None: defaults only), then apply non-None overrides of top-level keys
    (root, address, log_level: the CLI flags)."""
    table: dict[str, Any] = {}
    source = path or "defaults"
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except OSError as err:
            raise ConfigError(f"config file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path}: invalid TOML: {err}") from None
    config: Config = _build(Config, table, "", source)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        config = dataclasses.replace(config, **given)
        source = f"{source} + command line"
    return _validate(config, source)
