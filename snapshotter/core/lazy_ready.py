"""Lazy layers are served before a snapshot on them is: the core hands out no mount list
(Prepare, View, Mounts) until each lazy layer among the snapshot's parents answers
RemoteLayers.check; one that failed (or whose mount process died) is mounted again once, and
otherwise the call fails naming the layer, so no container ever sees a silently empty layer.
After a restart every remote snapshot is checked the same way, its new mounts started in
parallel and then waited for."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from snapshotter.core.errors import FailedPrecondition
from snapshotter.core.layers import RemoteLayers, RemoteLayerUnavailable
from snapshotter.core.metadata import SnapshotRecord
from snapshotter.vocabulary.labels import TARGET_REF, layer_digest_of

log = logging.getLogger("lazysnap.core")


def layer_name(labels: Mapping[str, str]) -> str:
    """The layer a snapshot's labels name, as the logs show it."""
    return layer_digest_of(labels) or labels.get(TARGET_REF, "?")


class LazyLayerReadiness:
    """Checks and mounts again the lazy layers of remote snapshot records; upper gives the
    mountpoint (the snapshot's fs/) of a snapshot id."""

    def __init__(self, remote: RemoteLayers, upper: Callable[[int], str]) -> None:
        self.remote = remote
        self.upper = upper

    def ready(self, records: Sequence[SnapshotRecord]) -> None:
        """Wait for each lazy layer's mount; one that failed (or died) is mounted again once.
        Raises FailedPrecondition naming the layer if it still cannot be served."""
        for record in records:
            upper = self.upper(record.id)
            try:
                self.remote.check(upper, record.labels)
                continue
            except RemoteLayerUnavailable as why:
                log.warning(
                    "lazy layer %s (snapshot %s) is not mounted, mounting it again: %s",
                    layer_name(record.labels),
                    record.key,
                    why,
                )
            try:
                self.remote.mount(upper, record.labels)
                self.remote.check(upper, record.labels)
            except Exception as err:
                log.error(
                    "lazy layer %s (snapshot %s) cannot be mounted: %s",
                    layer_name(record.labels),
                    record.key,
                    err,
                )
                raise FailedPrecondition(
                    f"lazy layer {layer_name(record.labels)} (snapshot {record.key!r}) cannot "
                    f"be mounted: {err}"
                ) from err

    def restore(self, records: Sequence[SnapshotRecord]) -> None:
        """After a restart: check each remote snapshot's mount and mount it again if needed.
        The mounts start in parallel; each is then waited for. One that cannot be mounted is
        logged, not raised: the others are served."""
        started: list[SnapshotRecord] = []
        for record in records:
            upper = self.upper(record.id)
            name = layer_name(record.labels)
            try:
                self.remote.check(upper, record.labels)
                log.info("remote snapshot %s (layer %s) is mounted", record.key, name)
                continue
            except RemoteLayerUnavailable as why:
                log.info(
                    "remote snapshot %s (layer %s) needs a new mount: %s", record.key, name, why
                )
            try:
                self.remote.mount(upper, record.labels)
                started.append(record)
            except RemoteLayerUnavailable as why:
                _log_unmountable(record, why)
        for record in started:
            try:
                self.remote.check(self.upper(record.id), record.labels)
                log.info(
                    "remote snapshot %s (layer %s) mounted again",
                    record.key,
                    layer_name(record.labels),
                )
            except RemoteLayerUnavailable as why:
                _log_unmountable(record, why)


def _log_unmountable(record: SnapshotRecord, why: Exception) -> None:
    log.error(
        "remote snapshot %s (layer %s) cannot be mounted: %s; containers using it "
        "will fail until it is removed",
        record.key,
        layer_name(record.labels),
        why,
    )
