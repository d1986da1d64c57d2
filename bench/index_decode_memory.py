"""Peak memory of decode_index (and of the mount process's tree) on crafted index blobs.

Each case is written to a temporary file and decoded in a fresh subprocess that imports
`snapshotter` from --tree (default: this checkout; give an older checkout for a before/after
figure); the child reports its VmHWM (peak RSS) before and after decoding, whether
decode_index refused the blob and how long it took. Cases (harness/crafted.py makes the bytes):

  bomb-160MiB      ~14 KB blob whose payload is 160 MiB of `[],[],...` (issue 12)
  bomb-values-cap  `[],[],...` with as many values as MAX_JSON_VALUES allows, in a blob
                   padded to pass the compression-ratio cap: the worst a crafted index costs
  strings-cap      `["ab","ab",...]` up to the string cap, padded likewise: a new str per
                   value, the costliest JSON per value counted
  entries-1M       1,000,000 valid entries (~850 KB blob; over MAX_ENTRIES)
  entries-cap-decode  MAX_ENTRIES valid entries, decoded (what the daemon's discovery pays)
  entries-cap      the same, decoded and then built into a LayerTree as a mount process
                   does (what a mount keeps for its life)
  entries-12k      12,800 entries (pybig's largest layer), decoded + tree

    $PY -m bench.index_decode_memory [--tree /work/main]
        [--cases bomb-160MiB,entries-1M]

Prints one markdown table row per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness.crafted import (
    document_blob,
    empty_lists_bomb,
    many_entries,
    short_strings_bomb,
)

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
def hwm_kb():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's over
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from snapshotter.index.codec import decode_index
from snapshotter.index.errors import IndexFormatError
data = open(sys.argv[2], "rb").read()
before = hwm_kb()
start = time.perf_counter()
outcome = "decoded"
try:
    index = decode_index(data)
    if sys.argv[3] == "tree":
        from snapshotter.fs.tree import LayerTree
        tree = LayerTree.from_index(index)
        outcome = f"decoded, tree of {len(tree)} inodes"
except IndexFormatError as exc:
    outcome = "refused: " + str(exc)[:110]
seconds = time.perf_counter() - start
after = hwm_kb()
print(json.dumps({"before_kb": before, "peak_kb": after, "seconds": seconds,
                  "outcome": outcome}))
"""


def _values_cap_bomb() -> bytes:
    from snapshotter.index.codec import MAX_JSON_VALUES, MAX_PAYLOAD_RATIO, PAYLOAD_RATIO_SLACK

    json_bytes = 3 * (MAX_JSON_VALUES // 2 - 2)  # a `[],` counts twice: bracket and comma
    # random bytes in the blob section inflate 1:1: enough of them pass the ratio cap
    padding = (json_bytes - PAYLOAD_RATIO_SLACK) // (MAX_PAYLOAD_RATIO - 1) + 1
    return empty_lists_bomb(json_bytes, padding)


def _strings_cap() -> bytes:
    from snapshotter.index.codec import MAX_JSON_STRINGS, MAX_PAYLOAD_RATIO, PAYLOAD_RATIO_SLACK

    count = MAX_JSON_STRINGS - 1
    padding = (5 * count - PAYLOAD_RATIO_SLACK) // (MAX_PAYLOAD_RATIO - 1) + 1
    return short_strings_bomb(count, padding)


def _entries_cap() -> bytes:
    from snapshotter.index.tar_toc import MAX_ENTRIES

    return document_blob(many_entries(MAX_ENTRIES - 1))


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bomb-160MiB": (lambda: empty_lists_bomb(160 << 20), "decode"),
    "bomb-values-cap": (_values_cap_bomb, "decode"),
    "strings-cap": (_strings_cap, "decode"),
    "entries-1M": (lambda: document_blob(many_entries(1_000_000)), "decode"),
    "entries-cap-decode": (_entries_cap, "decode"),
    "entries-cap": (_entries_cap, "tree"),
    "entries-12k": (lambda: document_blob(many_entries(12_800)), "tree"),
}


def measure(tree: Path, data: bytes, mode: str) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(prefix="index-", suffix=".bin") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tree), f.name, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_decode_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout to import from")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = parser.parse_args()
    print(f"tree {args.tree}")
    print("| case | blob bytes | peak RSS MB | of which decoding MB | s | outcome |")
    print("|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        make, mode = CASES[name]
        data = make()
        got = measure(args.tree, data, mode)
        peak, before = int(str(got["peak_kb"])), int(str(got["before_kb"]))
        print(
            f"| {name} | {len(data):,} | {peak / 1024:.0f} | {(peak - before) / 1024:.0f} "
            f"| {float(str(got['seconds'])):.2f} | {got['outcome']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
