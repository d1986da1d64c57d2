"""Which mounts use a blob's cached spans: users/<algorithm>/<hex>/<key hash>, one empty file
per mount, so that releasing one mount does not delete spans another still reads. The caller
holds the cache lock around each call."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from snapshotter.fs.cache_dirs import FILE_MODE, entries, private_directory


class CacheUsers:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, blob_dir: Path, key: str) -> None:
        """Record that mount key uses the blob whose spans are under blob_dir (relative:
        <algorithm>/<hex>)."""
        path = self._record(blob_dir, key)
        private_directory(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))

    def remove(self, blob_dir: Path, key: str) -> bool:
        """Drop mount key's record; True when no mount uses the blob any more."""
        path = self._record(blob_dir, key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if entries(path.parent):
            return False
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        return True

    def _record(self, blob_dir: Path, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / blob_dir / name
