"""Progress of `lazysnap index build`: one tqdm bar per layer being read and one total.

Bars go to stderr, and only when it is a terminal (tqdm is not even imported otherwise: 40 ms
of CPU), so scripts and tests see only the summary line. The bytes are counted as they are read
from the registry stream, so the bytes reported are the bytes actually pulled from the registry.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


class _NoBar:
    """What a bar is when stderr is not a terminal."""

    total: int | None = None

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(**options: Any) -> Any:
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, **options)


@dataclass
class BuildProgress:
    total_bytes: int
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: list[bool] = field(default_factory=list)
    _total: Any = None

    def __enter__(self) -> BuildProgress:
        self._total = _bar(total=self.total_bytes, desc="total", position=0, leave=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._total.close()

    def layer(self, digest: str, size: int) -> LayerProgress:
        # Reuse the lowest free screen line so concurrent bars do not drift downwards.
        with self._lock:
            slot = next((i for i, busy in enumerate(self._slots) if not busy), len(self._slots))
            if slot == len(self._slots):
                self._slots.append(True)
            self._slots[slot] = True
        bar = _bar(
            total=size, desc=digest.removeprefix("sha256:")[:12], position=slot + 1, leave=False
        )
        return LayerProgress(self, slot, bar)

    def skip(self, size: int) -> None:
        """A layer that will not be read after all (reused from the cache)."""
        with self._lock:
            self._total.total = max(0, (self._total.total or 0) - size)
            self._total.refresh()

    def _advance(self, n: int) -> None:
        with self._lock:
            self._total.update(n)

    def _release(self, slot: int) -> None:
        with self._lock:
            self._slots[slot] = False


@dataclass
class LayerProgress:
    owner: BuildProgress
    slot: int
    bar: Any
    bytes_read: int = 0

    def update(self, n: int) -> None:
        self.bytes_read += n
        self.bar.update(n)
        self.owner._advance(n)

    def close(self) -> None:
        self.bar.close()
        self.owner._release(self.slot)

    def seekable(self) -> bool:
        return False
