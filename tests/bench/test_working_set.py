"""bench/working_set.py end to end on a small image built here: busybox, a layer of
data files, and a layer whiting one of them out."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.images import (
    BuiltImage,
    TarEntry,
    busybox_layer_tar,
    file,
    layer_tar,
    whiteout,
    write_oci_layout,
)
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import encode_window
from snapshotter.index.spans import spans_for_range

REPO_ROOT = Path(__file__).resolve().parents[2]  # `python -m bench.working_set` runs from here
PROGRAM = [sys.executable, "-m", "bench.working_set"]
KNOWN = "data/known"
SPAN_SIZES = (128 << 10, 1 << 20)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def _text(seed: int, size: int) -> bytes:
    """Compressible but not trivial (~3x with gzip), so the file spans several spans."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=64)) + b"\n"
    return bytes(out[:size])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    work = tmp_path_factory.mktemp("ws-image")
    data = layer_tar(
        [
            file("data/before", _text(1, 300_000)),
            file(KNOWN, _text(2, 1_500_000)),
            file("data/other", _text(3, 400_000)),
            file("data/gone", b"whited out above\n"),
            file("data/sub/hidden", b"under an opaque directory above\n"),
        ]
    )
    top = layer_tar(
        [
            whiteout("data/gone"),
            TarEntry("data/sub/.wh..wh..opq"),
            file("data/sub/shown", b"above the opaque marker\n"),
        ]
    )
    return write_oci_layout(work / "layout", "latest", [busybox_layer_tar(work), data, top])


def _mounts_and_loops_under(path: Path) -> list[str]:
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return mounts + [line for line in loops if str(path) in line]


def _run_script(image: BuiltImage, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        *PROGRAM,
        "--image",
        str(image.layout),
        "--span-sizes",
        ",".join(f"{size >> 10}K" for size in SPAN_SIZES),
        "--work-dir",
        str(work),
        *extra,
    ]
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )


def test_reading_one_file_whole_shows_it_resident_and_costs_exactly_its_spans(
    image: BuiltImage, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    figures = tmp_path / "ws.json"
    # The tests fail the workload (and the script) unless the top layer's whiteout and opaque
    # directory were applied.
    shell = (
        "test ! -e /data/gone && test ! -e /data/sub/hidden && test -e /data/sub/shown"
        f" && cat /{KNOWN} > /dev/null"
    )
    result = _run_script(image, work, "--json", str(figures), "--", "sh", "-c", shell)
    assert result.returncode == 0, result.stderr
    raw: dict[str, Any] = json.loads(figures.read_text())
    [workload] = raw["workloads"]
    reads = {read["path"]: read for read in workload["files"]}
    known_size = 1_500_000
    assert reads[KNOWN]["ranges"] == [[0, known_size]]
    assert reads[KNOWN]["layer"] == 1
    assert "data/other" not in reads and "data/before" not in reads
    assert "bin/busybox" in reads  # sh and cat themselves
    # The data layer's spans are exactly those of the file, whole and by resident ranges.
    _assert_known_file_costs_its_spans(image, workload)
    smallest = workload["by_span_size"][0]["layers"][1]["whole_files"]
    assert smallest["spans"] >= 3 and smallest["window_bytes"] > 0
    assert f"| `sh -c {shell}` | 128K | " in result.stdout
    assert _mounts_and_loops_under(work) == []
    assert list(work.iterdir()) == []

    # The same reads mapped to other span layouts, without running anything again.
    again = tmp_path / "again.json"
    layouts = "128K/f64K,1M/f128K"
    result = subprocess.run(
        [*PROGRAM, "--image", str(image.layout), "--reads-from", str(figures),
         "--layouts", layouts, "--read-around", "0,1M", "--json", str(again)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [workload] = json.loads(again.read_text())["workloads"]
    assert [by["layout"] for by in workload["by_span_size"]] == layouts.split(",")
    assert [by["file_cut_min"] for by in workload["by_span_size"]] == [64 << 10, 128 << 10]
    _assert_known_file_costs_its_spans(image, workload)
    assert f"| `sh -c {shell}` | 128K/f64K | " in result.stdout
    _assert_read_around_takes_a_file_in_one_request(workload["by_span_size"][0])
    assert f"| `sh -c {shell}` | 128K/f64K | file | 1M | " in result.stdout


def _assert_read_around_takes_a_file_in_one_request(by_size: dict[str, Any]) -> None:
    """Budget 0 is one request per span the reads need; a budget above the known file's
    compressed size takes all of its spans (it is read whole) in one request."""
    arounds = {(a["scope"], a["budget"]): a for a in by_size["read_around"]}
    ranged = by_size["resident_ranges"]
    for scope in ("file", "dir", "layer"):
        none = arounds[(scope, 0)]
        assert none["requests"] == none["spans"] == ranged["spans"]
        assert none["compressed_bytes"] == ranged["compressed_bytes"]
    known_spans = by_size["layers"][1]["resident_ranges"]["spans"]
    assert known_spans >= 3
    around = arounds[("file", 1 << 20)]
    assert around["requests"] <= arounds[("file", 0)]["requests"] - (known_spans - 1)
    assert around["compressed_bytes"] >= ranged["compressed_bytes"]


def _assert_known_file_costs_its_spans(image: BuiltImage, workload: dict[str, Any]) -> None:
    """The data layer's spans are exactly those of the file, whole and by resident ranges."""
    blob = image.layout / "blobs" / "sha256" / image.layers[1].digest.split(":", 1)[1]
    for by_size in workload["by_span_size"]:
        with open(blob, "rb") as stream:
            index = build_layer_index(
                stream,
                media_type=image.layers[1].media_type,
                span_size=by_size["span_size"],
                file_cut_min=by_size["file_cut_min"],
            )
        entry = next(entry for entry in index.entries if entry.name == KNOWN)
        spans = spans_for_range(index, entry.offset, entry.offset + entry.size)
        windows = [len(encode_window(index.spans[n].window)) for n in spans]
        expected = {
            "spans": len(spans),
            "compressed_bytes": sum(index.spans[n].compressed_size for n in spans),
            "window_bytes": sum(windows),
            "runs": 1,  # one file: one run of consecutive spans
            "run_window_bytes": windows[0],
        }
        data_layer = by_size["layers"][1]
        assert data_layer["whole_files"] == expected
        assert data_layer["resident_ranges"] == expected
        assert by_size["layers"][2]["whole_files"]["spans"] == 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_leaves_no_mount_loop_device_or_temp_dir(
    image: BuiltImage, tmp_path: Path, stop: signal.Signals
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv = [*PROGRAM, "--image", str(image.layout), "--span-sizes", "1M",
            "--work-dir", str(work), "--", "sleep", "60"]  # fmt: skip
    process = subprocess.Popen(
        argv, cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "running it" in line:  # the workload (a sleep) is starting
                break
        else:
            pytest.fail(f"the script ended before running the workload: {process.wait()}")
        assert _mounts_and_loops_under(work) != []  # the tree is mounted while it runs
        process.send_signal(stop)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _mounts_and_loops_under(work) == []
    assert list(work.iterdir()) == []
