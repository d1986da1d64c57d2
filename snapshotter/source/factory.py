"""The daemon's lazy-layer implementation, assembled from its config: registry client ->
index discovery (the resolver) -> FUSE layer manager."""

from __future__ import annotations

import logging
import threading

from snapshotter.config import Config
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import RegistryHost
from snapshotter.remote.session_credentials import SessionCredentials
from snapshotter.source.discover import IndexDiscovery
from snapshotter.trust.keys import load_public_keys
from snapshotter.trust.policy import TrustMode, TrustPolicy

log = logging.getLogger("lazysnap.source")

# Stands for every endpoint without TLS settings of its own in hosts.toml (the usual case):
# they all share the connection pool this builds. Nothing is sent to it.
_DEFAULT_TLS_HOST = RegistryHost(url="https://registry.invalid")


def lazy_layers_from_config(
    config: Config, session: SessionCredentials | None = None
) -> LazyLayers:
    """session: pull credentials the CRI proxy keeps in memory per repository; discovery and
    the mount processes (handed them through a pipe) try them before the docker config."""
    remote = config.remote
    # The default credentials path is resolved here, once: mount processes get it explicitly,
    # so layer reads use the same credentials as discovery.
    access = RegistryAccess.create(
        hosts_dir=remote.hosts_dir,
        plain_http=remote.plain_http,
        docker_config=remote.docker_config,
        timeout=remote.fetch_timeout_seconds,
    )
    credentials = access.credentials()
    if session is not None:
        credentials.consult_first(session)
    client = access.client(credentials)
    trust = trust_policy_from_config(config)
    quiet = trust.mode is TrustMode.SIGNED and bool(trust.keys)
    log.log(logging.INFO if quiet else logging.WARNING, "index trust: %s", trust.describe())
    discovery = IndexDiscovery(
        client,
        access,
        trust=trust,
        min_layer_size=remote.min_layer_size,
        refusals=RefusalLedger(config.root),
    )
    threading.Thread(target=_warm_up, args=(client,), name="registry-warm-up", daemon=True).start()
    return LazyLayers(
        LazyLayerSettings.from_config(config),
        resolve=discovery,
        ledger=RefusalLedger(config.root),
        session_credentials=session,
    )


def trust_policy_from_config(config: Config) -> TrustPolicy:
    """[trust] as a policy (keys read here; config validation already read them once)."""
    return TrustPolicy(TrustMode(config.trust.mode), load_public_keys(config.trust.public_keys))


def _warm_up(client: RegistryClient) -> None:
    """Create the default HTTP connection pool now, while the daemon starts: its TLS context
    loads the system CA store (~20 ms), which would otherwise delay the first lazy Prepare."""
    try:
        client.warm_up(_DEFAULT_TLS_HOST)
    except Exception as exc:  # only an optimisation: the first request makes it anyway
        log.debug("registry connection pool warm-up failed: %s", exc)
