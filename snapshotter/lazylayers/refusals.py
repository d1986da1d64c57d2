"""What the completion check decided, kept on disk node-wide (the verdict on each mounted
layer, <mountpoint>.lazysnap-check, is a sidecar file: snapshotter/sidecars.py).

Written atomically (temp file, fsync, rename, fsync of the directory), standard library only
(`lazysnap status` reads it without loading index or FUSE code):

    ROOT/completion-ledger.json   node-wide: the index blobs refused here (a later Prepare of a
                                  layer whose index blob is listed falls back to a full pull,
                                  reason refused_index) and how many checks passed and failed
                                  (the metric lazysnap_completion_check_total). Bounded: at most
                                  MAX_REFUSED entries, the oldest dropped first.

Refusal is by index blob digest: the layer blob itself is genuine (its digest is the image's),
only the index that described it lied; another index of the same layer may be fine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.private_files import replace_private
from snapshotter.sidecars import FAILED, PASSED

LEDGER_NAME = "completion-ledger.json"
MAX_REFUSED = 4096
MAX_LEDGER_BYTES = 8 << 20  # a ledger file bigger than this is damaged: read as empty
MAX_DETAIL = 1000  # characters of "what differed" kept per record


class LedgerError(Exception):
    """The ledger could not be written; the message names the file."""


@dataclass(frozen=True)
class RefusedIndex:
    """An index blob that failed the completion check on this node."""

    index_digest: str
    layer_digest: str
    why: str
    artifact_digest: str = ""
    image: str = ""
    refused_at: float = 0.0


@dataclass
class _Ledger:
    passed: int = 0
    failed: int = 0
    refused: list[RefusedIndex] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "checks": {PASSED: self.passed, FAILED: self.failed},
            "refused": [asdict(entry) for entry in self.refused],
        }


class RefusalLedger:
    """ROOT/completion-ledger.json: refused index blobs and check counts. Thread-safe and
    process-safe for writers (a flock on the file's lock beside it); readers never lock (the
    file is replaced atomically). Reads are cached by the file's identity, so asking on every
    Prepare costs one stat."""

    def __init__(self, root: str) -> None:
        self.path = Path(root) / LEDGER_NAME
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._cached = _Ledger()

    def refused(self, index_digest: str) -> RefusedIndex | None:
        """The refusal of index_digest on this node, if any."""
        for entry in self.load().refused:
            if entry.index_digest == index_digest:
                return entry
        return None

    def refusals(self) -> list[RefusedIndex]:
        return list(self.load().refused)

    def counts(self) -> dict[str, int]:
        ledger = self.load()
        return {PASSED: ledger.passed, FAILED: ledger.failed}

    def record_pass(self) -> None:
        with self._changing() as ledger:
            ledger.passed += 1

    def record_refusal(self, refusal: RefusedIndex) -> None:
        """Count a failed check and refuse its index blob from now on (kept over restarts)."""
        with self._changing() as ledger:
            ledger.failed += 1
            kept = [e for e in ledger.refused if e.index_digest != refusal.index_digest]
            kept.append(refusal)
            ledger.refused = kept[-MAX_REFUSED:]

    def load(self) -> _Ledger:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return _Ledger()
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if identity == self._seen:
                return self._cached
        ledger = _parse(self.path)
        with self._lock:
            self._seen, self._cached = identity, ledger
        return ledger

    @contextlib.contextmanager
    def _changing(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with self._lock:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                ledger = _parse(self.path)
                yield ledger
                write_atomically(self.path, json.dumps(ledger.to_json(), indent=1) + "\n")
                self._seen = None
            finally:
                os.close(fd)


def _parse(path: Path) -> _Ledger:
    """The ledger at path; an empty one if it is missing. A damaged ledger reads as empty
    except for what can be salvaged entry by entry (it is only ever written atomically)."""
    try:
        if path.stat().st_size > MAX_LEDGER_BYTES:
            return _Ledger()
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return _Ledger()
    if not isinstance(data, dict):
        return _Ledger()
    checks = data.get("checks") if isinstance(data.get("checks"), dict) else {}
    assert isinstance(checks, dict)
    refused = []
    for item in data.get("refused") or []:
        if isinstance(item, dict) and isinstance(item.get("index_digest"), str):
            refused.append(
                RefusedIndex(
                    index_digest=item["index_digest"],
                    layer_digest=_text(item.get("layer_digest")),
                    why=_text(item.get("why")),
                    artifact_digest=_text(item.get("artifact_digest")),
                    image=_text(item.get("image")),
                    refused_at=_number(item.get("refused_at")),
                )
            )
    return _Ledger(
        passed=_count(checks.get(PASSED)),
        failed=_count(checks.get(FAILED)),
        refused=refused[-MAX_REFUSED:],
    )


def write_atomically(path: Path, text: str) -> None:
    """Private, atomic and durable (snapshotter/private_files.py); LedgerError naming path."""
    try:
        replace_private(path, text.encode(), durable=True)
    except OSError as exc:
        raise LedgerError(f"writing {path}: {exc.strerror}") from exc


def short_detail(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
