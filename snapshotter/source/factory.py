"""The daemon's lazy-layer implementation, assembled from its config: registry client ->
index discovery (the resolver) -> FUSE layer manager."""

from __future__ import annotations

from snapshotter.config import Config
from snapshotter.fs.manager import LazyLayers, from_config
from snapshotter.remote.auth import CredentialStore
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import BlobSettings, IndexDiscovery


def lazy_layers_from_config(config: Config) -> LazyLayers:
    remote = config.remote
    # Resolve the default credentials path once, here: mount processes get it explicitly, so
    # layer reads use the same credentials as discovery (an empty path would mean anonymous).
    docker_config = remote.docker_config or CredentialStore.default_config_path()
    client = RegistryClient(
        HostsConfig(remote.hosts_dir or None, plain_http=remote.plain_http),
        CredentialStore.from_docker_config(docker_config),
        timeout=remote.fetch_timeout_seconds,
    )
    discovery = IndexDiscovery(
        client,
        BlobSettings(remote.hosts_dir, remote.plain_http, docker_config),
        min_layer_size=remote.min_layer_size,
    )
    return from_config(config, resolve=discovery)
