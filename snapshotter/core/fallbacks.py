"""Why each recent layer was not mounted lazily, kept on disk beside the snapshots.

The core records one entry per Prepare that fell back to an ordinary snapshot: the snapshot
key, the target and layer digest, the reason class (a FallbackReason value) and the message.
It lives in ROOT/fallbacks.json, so readers in other processes find it: `lazysnap status`
(works while `serve` is down) and a `lazysnap pull` running in its own process, which looks up
the Prepare key it sent. A pull run by the daemon asks the live FallbackLog directly.

Bounded: the newest DEFAULT_CAPACITY entries are kept (oldest dropped first). Written whole,
atomically (temporary file + rename), so a reader never sees half a file. Standard library only:
`lazysnap status` and `lazysnap pull` import this without loading the core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("lazysnap.core")

FALLBACKS_FILE = "fallbacks.json"
DEFAULT_CAPACITY = 256
MAX_MESSAGE = 2000  # characters kept of one message (a registry's error page can be long)


@dataclass(frozen=True)
class Fallback:
    key: str  # the snapshot key of the Prepare, as the snapshotter saw it
    target: str  # containerd.io/snapshot.ref: the chain ID it would have been committed as
    layer_digest: str  # the compressed layer's digest, "" when the labels name none
    reason: str  # a FallbackReason value
    message: str
    at: float  # seconds since the epoch

    @property
    def summary(self) -> str:
        """`reason: message`, as `lazysnap pull` and `lazysnap status` print it."""
        return f"{self.reason}: {self.message}"

    def matches_key(self, key: str) -> bool:
        """True if this Prepare was for key: containerd prefixes the key a client sends with
        `<namespace>/<id>/` before a proxy snapshotter sees it."""
        return self.key == key or self.key.endswith("/" + key)

    @classmethod
    def from_json(cls, obj: Any) -> Fallback | None:
        """The entry obj holds, or None if it is not one (a damaged or foreign file)."""
        if not isinstance(obj, dict):
            return None
        texts = ("key", "target", "layer_digest", "reason", "message")
        if not all(isinstance(obj.get(name), str) for name in texts):
            return None
        at = obj.get("at")
        if not isinstance(at, int | float) or isinstance(at, bool):
            return None
        key, target, layer_digest, reason, message = (str(obj[name]) for name in texts)
        return cls(key, target, layer_digest, reason, message, float(at))


class FallbackLog:
    """The recorded fallbacks of one root, newest last. Thread-safe."""

    def __init__(self, root: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.path = os.path.join(root, FALLBACKS_FILE)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Fallback] = OrderedDict(
            (entry.key, entry) for entry in read_fallbacks(root)[-capacity:]
        )

    def record(self, fallback: Fallback) -> None:
        """Keep fallback (its message cut to MAX_MESSAGE) and write the file. A write that
        fails is logged: the fallback itself must still go ahead."""
        fallback = _bounded(fallback)
        with self._lock:
            self._entries.pop(fallback.key, None)
            self._entries[fallback.key] = fallback
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            self._write()

    def forget_layer(self, layer_digest: str) -> None:
        """The layer is lazy now: its older fallbacks no longer describe it."""
        if not layer_digest:
            return
        with self._lock:
            stale = [k for k, e in self._entries.items() if e.layer_digest == layer_digest]
            for key in stale:
                del self._entries[key]
            if stale:
                self._write()

    def find(self, key: str) -> Fallback | None:
        """The fallback of the Prepare of key (as the client sent it), if one was recorded."""
        with self._lock:
            return _find(list(self._entries.values()), key)

    def entries(self) -> list[Fallback]:
        with self._lock:
            return list(self._entries.values())

    def _write(self) -> None:
        data = json.dumps([asdict(e) for e in self._entries.values()], indent=0).encode()
        directory = os.path.dirname(self.path)
        try:
            fd, temp = tempfile.mkstemp(prefix=".fallbacks-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(temp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        except OSError as err:
            log.warning("cannot record why layers fell back in %s: %s", self.path, err)


def read_fallbacks(root: str) -> list[Fallback]:
    """The fallbacks recorded under root, oldest first; [] if there is no readable file."""
    try:
        with open(os.path.join(root, FALLBACKS_FILE), "rb") as source:
            data = json.loads(source.read())
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [entry for entry in map(Fallback.from_json, data) if entry is not None]


def find_fallback(root: str, key: str) -> Fallback | None:
    """The recorded fallback of the Prepare of key under root (for a pull in another process)."""
    return _find(read_fallbacks(root), key)


def _find(entries: list[Fallback], key: str) -> Fallback | None:
    for entry in reversed(entries):
        if entry.matches_key(key):
            return entry
    return None


def _bounded(fallback: Fallback) -> Fallback:
    if len(fallback.message) <= MAX_MESSAGE:
        return fallback
    cut = fallback.message[: MAX_MESSAGE - 1] + "…"
    return Fallback(
        fallback.key, fallback.target, fallback.layer_digest, fallback.reason, cut, fallback.at
    )
