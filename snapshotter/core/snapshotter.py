"""The snapshot core: containerd's overlayfs snapshotter semantics, plus the remote-layer path.

On-disk layout (as overlayfs): ROOT/metadata.db, ROOT/snapshots/<id>/{fs,work}.

Crash safety: every operation is one metadata transaction, and the filesystem steps are ordered
around it so that a process killed at any instant leaves at most a directory that no snapshot
owns (Cleanup removes those), never a snapshot row without its directory:
- create: build new-XXXX/{fs,work}, rename it to <id> (and fsync), then commit the row;
- remove: commit the row's deletion, then delete the directory;
- commit: a single row update; nothing on disk moves.
A directory being deleted is first renamed to rm-* under the lock, so an id reused after a
rolled-back create can never have its fresh directory deleted by a concurrent Cleanup. The
directories' side of this is snapshot_dirs.py.

Remote path: Prepare with labels naming a target ("containerd.io/snapshot.ref") asks the injected
RemoteLayers to mount the layer at <id>/fs; on success the target is committed at once (labelled
remote) and AlreadyExists tells containerd the layer is there. The mount runs without the metadata
lock held: the id is reserved by a committed transaction and the directory is marked in flight.
RemoteLayers.mount may return before the mount is ready (so an image's layers mount in
parallel): every call that hands out mounts (Prepare, View, Mounts) first waits, through
RemoteLayers.check, for the lazy layers among the snapshot's parents, mounts a failed one again
once, and otherwise fails naming it, so no container ever sees a silently empty layer
(lazy_ready.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence

from snapshotter.core import filters, layout
from snapshotter.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.core.fallbacks import Fallback, FallbackLog
from snapshotter.core.info import (
    Info,
    Usage,
    disk_usage,
    filter_fields,
    info_of,
    validate_labels,
)
from snapshotter.core.layers import FallbackReason, RemoteLayers, RemoteLayerUnavailable
from snapshotter.core.lazy_ready import LazyLayerReadiness, layer_name
from snapshotter.core.metadata import Kind, MetaStore, SnapshotRecord, Transaction
from snapshotter.core.mounts import (
    Mount,
    OverlayFeatures,
    detach_mount,
    mount_points_under,
    probe_overlay_features,
    snapshot_mounts,
)
from snapshotter.core.outcomes import PreparedLayer, PrepareObserver, PrepareOutcome
from snapshotter.core.snapshot_dirs import SnapshotDirs
from snapshotter.vocabulary.labels import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    TARGET_REF,
    is_remote,
    layer_digest_of,
)

log = logging.getLogger("lazysnap.core")

__all__ = [
    "Info",
    "Kind",
    "Mount",
    "Snapshotter",
    "Usage",
    "disk_usage",
    "validate_labels",
]


# Aliases so that annotations inside Snapshotter are not taken for its method `list`.
MountList = list[Mount]
PathList = list[str]
RecordList = list[SnapshotRecord]
InfoList = list[Info]


def _is_remote(record: SnapshotRecord) -> bool:
    return is_remote(record.labels)


class Snapshotter:
    """Prepare/View/Mounts/Commit/Remove/Stat/Update/List/Usage/Cleanup over ROOT. Thread-safe."""

    def __init__(
        self,
        root: str,
        remote: RemoteLayers | None = None,
        features: OverlayFeatures | None = None,
        observer: PrepareObserver | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.remote = remote
        self.observer = observer  # told each Prepare's outcome (the daemon's metrics)
        self.features = features if features is not None else probe_overlay_features()
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.dirs = SnapshotDirs(self.root)
        self._readiness = (
            LazyLayerReadiness(remote, self.dirs.upper) if remote is not None else None
        )
        self.snapshots_dir = self.dirs.snapshots_dir
        self._store = MetaStore(layout.metadata_path(self.root))
        # Why recent layers were not lazy: read by `lazysnap status` and `lazysnap pull`.
        self.fallbacks = FallbackLog(self.root)

    def close(self) -> None:
        self._store.close()

    # -- queries ---------------------------------------------------------------------------

    def stat(self, key: str) -> Info:
        with self._store.transaction(writable=False) as tx:
            return info_of(tx.get(key))

    def mounts(self, key: str) -> MountList:
        with self._store.transaction(writable=False) as tx:
            record = tx.find(key)
            if record is None:
                raise NotFound(f"failed to get active mount: snapshot {key!r} does not exist")
            if record.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(
                    f"failed to get active mount: requested snapshot {key!r} not active or view"
                )
            lazy = self._lazy_ancestors(tx, record)
            mounts = self._mounts(tx, record)
        self._ready(lazy)
        return mounts

    def _mounts(self, tx: Transaction, record: SnapshotRecord) -> MountList:
        parents = [self.dirs.upper(pid) for pid in tx.parent_ids(record)]
        return snapshot_mounts(
            record.kind,
            self.dirs.upper(record.id),
            self.dirs.work(record.id),
            parents,
            self.features,
        )

    def list(self, filter_strings: Sequence[str] = ()) -> InfoList:
        """Snapshots matching any of the filters (containerd filter syntax), ordered by name."""
        matcher = filters.parse_all(filter_strings)
        with self._store.transaction(writable=False) as tx:
            records = tx.all()
        return [info_of(r) for r in records if matcher.match(filter_fields(r))]

    def usage(self, key: str) -> Usage:
        with self._store.transaction(writable=False) as tx:
            record = tx.get(key)
        if record.kind is Kind.ACTIVE:
            return disk_usage(self.dirs.upper(record.id))
        return Usage(size=record.size, inodes=record.inodes)

    # -- creating --------------------------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> MountList:
        labels = dict(labels or {})
        if self.remote is not None and labels.get(TARGET_REF):
            return self._prepare_remote(key, parent, labels, self.remote)
        self._ready_parent_chain(parent)
        mounts = self._create(Kind.ACTIVE, key, parent, labels)
        if labels.get(TARGET_REF):  # a puller asked for a lazy layer
            self._record_fallback(
                key,
                labels,
                FallbackReason.DISABLED,
                "this daemon serves no lazy layers (remote.enable = false, or they failed to "
                "load: see the daemon's log at its start)",
            )
        # Counted as ordinary even then: this daemon serves no lazy layer to fall back from.
        self._observe(PreparedLayer(key, labels), PrepareOutcome.ORDINARY)
        return mounts

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> MountList:
        self._ready_parent_chain(parent)
        return self._create(Kind.VIEW, key, parent, dict(labels or {}))

    def _check_new(self, tx: Transaction, key: str, parent: str) -> SnapshotRecord | None:
        """The checks of containerd's CreateSnapshot, in its order; returns the parent."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_record = None
        if parent:
            parent_record = tx.find(parent)
            if parent_record is None:
                raise NotFound(f"missing parent {parent!r} bucket: snapshot does not exist")
            if parent_record.kind is not Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
        if tx.find(key) is not None:
            raise AlreadyExists(f"snapshot {key!r}: already exists")
        return parent_record

    def _inherit_owner(self, tx: Transaction, record: SnapshotRecord, upper: str) -> None:
        parent_ids = tx.parent_ids(record)
        if parent_ids:
            st = os.stat(self.dirs.upper(parent_ids[0]))
            os.lchown(upper, st.st_uid, st.st_gid)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> MountList:
        validate_labels(labels)
        with self._store.transaction(writable=True) as tx:
            parent_record = self._check_new(tx, key, parent)
            temp = self.dirs.new(kind)
            try:
                snapshot_id = tx.allocate_id()
                record = tx.insert(
                    snapshot_id,
                    kind,
                    key,
                    parent_record.id if parent_record else None,
                    labels,
                    _now_ns(),
                )
                self._inherit_owner(tx, record, os.path.join(temp, "fs"))
                self.dirs.place(temp, snapshot_id)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            return self._mounts(tx, record)

    # -- the remote path -------------------------------------------------------------------

    def _prepare_remote(
        self, key: str, parent: str, labels: dict[str, str], remote: RemoteLayers
    ) -> MountList:
        validate_labels(labels)
        target = labels[TARGET_REF]
        with self._store.transaction(writable=True) as tx:
            self._check_new(tx, key, parent)
            if tx.find(target) is not None:
                raise AlreadyExists(f"target snapshot {target!r}: already exists")
            # Committing the id reservation means it is never handed out again, so the
            # directory can sit at its final path while we mount without holding the lock.
            snapshot_id = tx.allocate_id()
            temp = self.dirs.new(Kind.ACTIVE)
            try:
                self.dirs.place(temp, snapshot_id)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            self.dirs.mark_in_flight(str(snapshot_id))
        try:
            return self._finish_remote(key, parent, labels, target, snapshot_id, remote)
        finally:
            self.dirs.unmark_in_flight(str(snapshot_id))

    def _finish_remote(
        self,
        key: str,
        parent: str,
        labels: dict[str, str],
        target: str,
        snapshot_id: int,
        remote: RemoteLayers,
    ) -> MountList:
        upper = self.dirs.upper(snapshot_id)
        reason: FallbackReason | None = None  # why not, when not mounted
        try:
            remote.mount(upper, labels)
            mounted = True
        except RemoteLayerUnavailable as why:
            reason = why.reason
            log.info("layer %s falls back to a full pull: %s: %s", layer_name(labels), reason, why)
            self._record_fallback(key, labels, reason, str(why))
            mounted = False
        except Exception as err:  # a bug in the lazy layer must not stop the pull
            reason = FallbackReason.INTERNAL_ERROR
            message = f"unexpected {type(err).__name__}: {err}"
            log.warning(
                "layer %s falls back to a full pull: %s: %s", layer_name(labels), reason, message
            )
            self._record_fallback(key, labels, reason, message)
            mounted = False
        try:
            if not mounted:  # an ordinary snapshot on top of parents that may be lazy
                self._ready_parent_chain(parent)
            with self._store.transaction(writable=True) as tx:
                parent_record = self._check_new(tx, key, parent)
                parent_id = parent_record.id if parent_record else None
                if not mounted:
                    if mount_points_under(upper):
                        detach_mount(upper)
                    record = tx.insert(snapshot_id, Kind.ACTIVE, key, parent_id, labels, _now_ns())
                    self._inherit_owner(tx, record, upper)
                    mounts = self._mounts(tx, record)
                else:
                    if tx.find(target) is not None:
                        raise AlreadyExists(f"target snapshot {target!r}: already exists")
                    remote_labels = {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}
                    tx.insert(
                        snapshot_id, Kind.COMMITTED, target, parent_id, remote_labels, _now_ns()
                    )
        except BaseException:
            # Whatever failed, the reserved directory belongs to no snapshot: release it.
            if mounted:
                self._unmount_remote(upper)
            self.dirs.delete(self.dirs.path(snapshot_id))
            raise
        if not mounted:
            self._observe(PreparedLayer(key, labels), PrepareOutcome.FALLBACK, reason)
            return mounts
        log.info("layer %s is mounted lazily as snapshot %s", layer_name(labels), target)
        self.fallbacks.forget_layer(layer_digest_of(labels))
        self._observe(PreparedLayer(key, labels, upper), PrepareOutcome.LAZY)
        raise AlreadyExists(f"target snapshot {target!r}: already exists")

    def _record_fallback(
        self, key: str, labels: Mapping[str, str], reason: FallbackReason, message: str
    ) -> None:
        target = labels.get(TARGET_REF, "")
        digest = layer_digest_of(labels)
        self.fallbacks.record(Fallback(key, target, digest, reason.value, message, time.time()))

    def _observe(
        self, layer: PreparedLayer, outcome: PrepareOutcome, reason: FallbackReason | None = None
    ) -> None:
        """Tell the observer; its failure is logged, never the Prepare's."""
        if self.observer is None:
            return
        try:
            self.observer(layer, outcome, reason)
        except Exception:
            log.exception("the Prepare observer failed on %s (%s)", layer.key, outcome)

    def _unmount_remote(self, upper: str) -> None:
        if self.remote is None:
            return
        try:
            self.remote.unmount(upper)
        except Exception as err:
            log.warning("cannot unmount remote layer at %s: %s", upper, err)

    def _lazy_ancestors(self, tx: Transaction, record: SnapshotRecord) -> RecordList:
        """The remote snapshots among record's ancestors (the lowerdirs of its mounts)."""
        if self.remote is None:
            return []
        chain = set(tx.parent_ids(record))
        if not chain:
            return []
        return [r for r in tx.all() if r.id in chain and _is_remote(r)]

    def _ready_parent_chain(self, parent: str) -> None:
        """Wait for the lazy layers a new snapshot on parent will stack on."""
        if self.remote is None or not parent:
            return
        with self._store.transaction(writable=False) as tx:
            record = tx.find(parent)
            if record is None:
                return  # the create itself says so
            lazy = self._lazy_ancestors(tx, record)
            if _is_remote(record):
                lazy.insert(0, record)
        self._ready(lazy)

    def _ready(self, records: Sequence[SnapshotRecord]) -> None:
        """Wait for the lazy layers of records (lazy_ready.py); FailedPrecondition naming one
        that cannot be served."""
        if records:
            assert self._readiness is not None  # only remote snapshots are lazy
            self._readiness.ready(records)

    def restore_remote_snapshots(self) -> None:
        """After a restart: check every remote snapshot's mount and mount it again if needed
        (lazy_ready.py)."""
        with self._store.transaction(writable=False) as tx:
            records = [r for r in tx.all() if r.kind is Kind.COMMITTED and _is_remote(r)]
        if records and self._readiness is None:
            log.warning(
                "%d remote snapshots exist but remote layers are disabled; they are not served",
                len(records),
            )
            return
        if self._readiness is not None:
            self._readiness.restore(records)

    # -- changing --------------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        labels = dict(labels or {})
        validate_labels(labels)
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        with self._store.transaction(writable=True) as tx:
            record = tx.get(key)
            usage = disk_usage(self.dirs.upper(record.id))
            if tx.find(name) is not None:
                raise AlreadyExists(
                    f"failed to commit snapshot: committed snapshot {name!r} already exists"
                )
            if record.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f"failed to commit snapshot: snapshot {key!r} is not active"
                )
            tx.commit_active(record, name, labels, (usage.size, usage.inodes))

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Only labels are mutable: paths "labels" and "labels.<key>"; none means all labels."""
        with self._store.transaction(writable=True) as tx:
            record = tx.find(info.name)
            if record is None:
                raise NotFound(f"snapshot {info.name!r} does not exist")
            labels = dict(record.labels)
            if fieldpaths:
                for path in fieldpaths:
                    if path.startswith("labels."):
                        label = path[len("labels.") :]
                        labels[label] = info.labels.get(label, "")
                    elif path == "labels":
                        labels = dict(info.labels)
                    else:
                        raise InvalidArgument(
                            f"cannot update {path!r} field on snapshot {info.name!r}"
                        )
            else:
                labels = dict(info.labels)
            validate_labels(labels)
            if _is_remote(record):
                # How the data is held is not a user label: keep it so Remove unmounts.
                labels[REMOTE_LABEL] = REMOTE_LABEL_VALUE
            return info_of(tx.set_labels(record, labels))

    def remove(self, key: str) -> None:
        released: str | None = None
        try:
            with self._store.transaction(writable=True) as tx:
                record = tx.find(key)
                if record is None:
                    raise NotFound(f"failed to remove: snapshot {key!r} does not exist")
                if tx.has_children(record.id):
                    raise FailedPrecondition(
                        f"failed to remove: cannot remove snapshot {key!r} with child"
                    )
                if _is_remote(record):
                    self._unmount_remote(self.dirs.upper(record.id))
                tx.delete(record)
                # In flight from here on: a concurrent Cleanup must not race our deletion.
                released = str(record.id)
                self.dirs.mark_in_flight(released)
                trash = self._trash_orphans(tx)
            # Committed: the id is never reused, so the directory can go at leisure.
            self.dirs.delete(self.dirs.path(record.id))
            self.dirs.empty_trash(trash)
        finally:
            if released is not None:
                self.dirs.unmark_in_flight(released)

    def cleanup(self) -> None:
        """Delete every directory under snapshots/ that no snapshot owns."""
        with self._store.transaction(writable=True) as tx:
            trash = self._trash_orphans(tx)
        self.dirs.empty_trash(trash)

    def _trash_orphans(self, tx: Transaction) -> PathList:
        """The directories no snapshot owns, moved to the trash; call with the write lock."""
        owned = {str(i) for i in tx.owned_ids()}
        return self.dirs.trash_orphans(
            owned, self._unmount_remote if self.remote is not None else None
        )


def _now_ns() -> int:
    return time.time_ns()
