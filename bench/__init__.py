"""lazysnap's benchmarks: each module with a `main` is a program, run from the repository root
as `$PY -m bench.NAME`, PY being the venv's python (/opt/lazysnap-venv/bin/python); most need
root. docs/benchmarks.md has the commands and the figures they gave.

They drive the real stack through `harness` (registry, containerd, `lazysnap serve`) and import
`snapshotter` like any other user; nothing in `snapshotter` or `tests` is imported from here,
and only tests/bench imports this package. This module imports only the standard library, so a
worker that must load `snapshotter` from another checkout (index_build) can still choose it.
A few programs start children by file path, which therefore import nothing of `bench`:
critical_path_decode (runs a variant checkout's decoder), startup_delayline (the shaped link's
delay line) and fuse_takeover's FUSE servers.
"""

from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    """The command that started this process, as it can be typed again (`-m bench.NAME`)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return shlex.join([sys.executable, *program, *sys.argv[1:]])
