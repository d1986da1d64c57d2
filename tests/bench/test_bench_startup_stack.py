"""The startup benchmark against the real stack: the shaped link has the shape it claims and
leaves nothing behind, and a --quick run measures both configurations without errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.startup_link import Shape, shaped_link
from harness.images import file, layer_tar, push, write_oci_layout
from harness.registry import Registry, start_registry

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]  # `python -m bench.startup` runs from here


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_shaped_link_is_100mbit_20ms_and_is_torn_down(tmp_path: Path) -> None:
    # 6 MB of incompressible data: ~0.5 s at 100 Mbit/s, enough to see the rate limit.
    built = write_oci_layout(
        tmp_path / "layout", "latest", [layer_tar([file("blob", os.urandom(6_000_000))])]
    )
    setup = start_registry(tmp_path / "registry")
    try:
        push(built, setup.host, "bench/probe")
    finally:
        setup.stop()
    blob = f"/v2/bench/probe/blobs/{built.layers[0].digest}"
    before = _netns_names()
    with shaped_link(tmp_path / "registry", Shape(), probe_blob=blob) as link:
        namespaces = _netns_names() - before
        assert len(namespaces) == 1
        assert 18 <= link.measured["rtt_ms"] <= 40
        assert 6 <= link.measured["get_mb_s"] <= 13  # 100 Mbit/s = 12.5 MB/s
        assert link.registry.blob_fetches()[built.layers[0].digest].bytes == built.layers[0].size
    assert _netns_names() & namespaces == set()
    token = next(iter(namespaces)).removeprefix("lzbench-")
    assert not {f"lzb{token}h", f"lzb{token}n"} & set(os.listdir("/sys/class/net"))


def test_quick_run_measures_every_configuration(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--quick", "--results", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = Path(result.stdout.strip())
    records = (report.parent / "results.jsonl").read_text().splitlines()
    trials = [r for r in map(json.loads, records) if r["kind"] == "trial"]
    assert [(t["workload"], t["mode"], t["error"]) for t in trials] == [
        ("busybox-echo", "full", None),
        ("busybox-echo", "lazysnap", None),
        ("seqread", "full", None),
        ("seqread", "lazysnap", None),
        ("seqread", "lazysnap+profile", None),
    ]
    for seq_lazy in trials[3:]:
        assert seq_lazy["lazy_layers"] == 1  # the 40 MB data layer is mounted, not pulled
        assert seq_lazy["read_bytes"] == 40_000_000
    # the profile (readtime reads the whole file) was prefetched: all of the data layer's
    # spans were fetched before the container asked, so the first run read no less
    header = json.loads(records[0])
    assert header["profiles"]["seqread"].startswith("ok"), header["profiles"]
    assert "Command: `" in report.read_text()
    assert (report.parent / "startup-loopback.png").exists()


def test_bytes_fetched_by_a_step_stop_at_the_log_offset_taken_when_it_ended(
    registry: Registry, tmp_path: Path
) -> None:
    # The benchmark takes only the access log's offset when the pull ends (counting waits for
    # the log to settle, which would let mounts and prefetches work off the clock) and counts
    # later: a fetch after that offset must not count as the pull's.
    tars = [layer_tar([file(name, os.urandom(50_000))]) for name in ("early", "late")]
    image = push(write_oci_layout(tmp_path / "layout", "latest", tars), registry.host, "b/u")
    early, late = image.layers
    since = registry.log_offset()
    for layer in (early, late):
        urllib.request.urlopen(f"http://{registry.host}/v2/b/u/blobs/{layer.digest}").read()
        registry.wait_log_quiet()
        if layer is early:
            step_end = registry.log_offset()
    during_step = registry.blob_fetches(since, step_end)
    assert set(during_step) == {early.digest}
    assert during_step[early.digest].bytes == early.size
    assert set(registry.blob_fetches(since)) == {early.digest, late.digest}
