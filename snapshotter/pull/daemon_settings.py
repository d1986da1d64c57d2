"""Warnings before a pull: registry settings given to `lazysnap pull` that the daemon's lazy
layers will not have.

A pull's `--plain-http` and the caller's docker config reach only the pull's own requests
(manifest, config, layers pulled whole). The daemon finds indexes and reads lazy layers with its
own settings ([remote] plain_http, hosts_dir, docker_config), and on purpose: a lazily mounted
layer is shared by every image and user on the node and reads from the registry long after the
pull, so one pull's flags must not downgrade TLS, or send the daemon's credentials in clear,
for reads made on behalf of others. Where the two disagree, the daemon's lookups fail and every
such layer is pulled whole; these warnings say so before the pull starts, naming the key to set.
"""

from __future__ import annotations

from snapshotter.config import DEFAULT_CONFIG_PATH, RemoteConfig
from snapshotter.pull.request import PullRequest
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.reference import Reference

# containerd's own snapshotters: a pull into one of them asks lazysnap for nothing.
CONTAINERD_BUILTIN_SNAPSHOTTERS = frozenset(
    {"overlayfs", "native", "btrfs", "zfs", "devmapper", "aufs", "blockfile"}
)


def daemon_setting_warnings(
    request: PullRequest, remote: RemoteConfig, daemon_default_docker_config: str
) -> list[str]:
    """What the daemon with remote settings will do differently from this pull, as messages
    (none when they agree, or when the pull cannot start anyway: it reports that itself).
    daemon_default_docker_config: the credentials file the daemon reads when remote names
    none (its $DOCKER_CONFIG or ~/.docker, which a client can only guess)."""
    if not remote.enable:
        return []  # nothing lazy to lose: each layer's line says `disabled`
    if request.snapshotter in CONTAINERD_BUILTIN_SNAPSHOTTERS:
        return []  # not unpacking into lazysnap: nothing could be lazy anyway
    try:
        registry = Reference.parse(request.image).registry
    except ValueError:
        return []
    warnings = []
    if request.plain_http and not _daemon_speaks_http(remote, registry):
        warnings.append(
            f"--plain-http applies to this pull's own requests only: `lazysnap serve` reads "
            f"lazy layers with its own settings, which speak https to {registry}, so every "
            f"layer of {request.image} will be pulled whole. To have them lazy, add "
            f'"{registry}" to plain_http under [remote] in its config ({DEFAULT_CONFIG_PATH} '
            f"by default) and restart it"
        )
    daemon_config = remote.docker_config or daemon_default_docker_config
    if _has_credentials(request.docker_config, registry) and not _has_credentials(
        daemon_config, registry
    ):
        warnings.append(
            f"your credentials for {registry} apply to this pull's own requests only: "
            f"`lazysnap serve` finds indexes and reads lazy layers with the credentials in "
            f"{daemon_config}, which has none for {registry}; if {request.image} needs them, "
            f"its layers will be pulled whole. Set docker_config under [remote] in its config "
            f"to a docker config.json that has them"
        )
    return warnings


def _daemon_speaks_http(remote: RemoteConfig, registry: str) -> bool:
    hosts = RegistryAccess.create(hosts_dir=remote.hosts_dir, plain_http=remote.plain_http).hosts()
    try:
        return any(host.scheme == "http" for host in hosts.hosts_for(registry, "pull"))
    except RegistryError:
        return True  # a broken hosts.toml: the daemon's own lookups report it


def _has_credentials(docker_config: str | None, registry: str) -> bool:
    try:
        credentials = RegistryAccess.create(docker_config=docker_config).credentials()
        return credentials.get(registry) is not None
    except RegistryError:
        return False  # unreadable: the pull (or the daemon) reports it where it is read
