"""What `lazysnap status` and the metrics endpoint say about completion checks, from the node's
ledger (ROOT/completion-ledger.json), as the daemon's manager leaves it; the checks themselves
are tested through real mounts in tests/fs/test_completion_fs.py and tests/lazy."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from snapshotter.lazylayers.refusals import RefusalLedger, RefusedIndex
from snapshotter.metrics import DaemonMetrics

INDEX = "sha256:" + "1f" * 32
LAYER = "sha256:" + "2e" * 32


def _ledger(root: Path) -> None:
    ledger = RefusalLedger(str(root))
    ledger.record_pass()
    ledger.record_pass()
    ledger.record_refusal(
        RefusedIndex(
            INDEX,
            LAYER,
            "the index's TOC differs from the tar stream: entry 3 'etc/x': mode is 0o644 ...",
            artifact_digest="sha256:" + "3d" * 32,
            image="reg:5000/app:1",
        )
    )


def _status(root: Path, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "status", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_status_lists_refused_indexes_and_check_counts(tmp_path: Path) -> None:
    _ledger(tmp_path)
    report = json.loads(_status(tmp_path, "--json"))
    assert report["completion_checks"] == {"passed": 2, "failed": 1}
    [refused] = report["refused_indexes"]
    assert (refused["index_digest"], refused["layer_digest"]) == (INDEX, LAYER)
    assert refused["image"] == "reg:5000/app:1" and "mode is 0o644" in refused["why"]
    table = _status(tmp_path)
    assert "1 index blob(s) refused on this node:" in table
    assert f"{INDEX}  layer sha256:2e2e2e2e2e2e  image reg:5000/app:1: the index's TOC" in table


def test_the_metrics_count_checks_by_result(tmp_path: Path) -> None:
    _ledger(tmp_path)
    metrics = DaemonMetrics(str(tmp_path), str(tmp_path / "cache"), 1 << 30)
    metrics.serve("127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.stop()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("lazysnap_completion_check_total", (("result", "passed"),))] == 2
    assert samples[("lazysnap_completion_check_total", (("result", "failed"),))] == 1
    assert samples[("lazysnap_refused_indexes", ())] == 1
