"""Index decode and tree build, in process, for `critical_path.py decode-tree`.

    PYTHONPATH=CHECKOUT python critical_path_decode.py INDEX_FILE REPEATS

Times snapshotter.index.codec.decode_index(INDEX_FILE bytes) and
snapshotter.fs.tree.LayerTree.from_index(index) of the checkout on PYTHONPATH, REPEATS times
each, alternating, and prints one JSON object: {"entries": N, "decode_s": [...], "tree_s":
[...]} (seconds per repeat).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        print("usage: critical_path_decode.py INDEX_FILE REPEATS", file=sys.stderr)
        return 2
    from snapshotter.fs.tree import LayerTree
    from snapshotter.index.codec import decode_index

    try:
        data = Path(argv[0]).read_bytes()
    except OSError as exc:
        print(f"critical_path_decode.py: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 1
    decode_s: list[float] = []
    tree_s: list[float] = []
    index = decode_index(data)
    for _ in range(int(argv[1])):
        started = time.perf_counter()
        index = decode_index(data)
        decode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        LayerTree.from_index(index)
        tree_s.append(time.perf_counter() - started)
    print(json.dumps({"entries": len(index.entries), "decode_s": decode_s, "tree_s": tree_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
