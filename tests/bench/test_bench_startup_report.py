"""The startup benchmark's report: medians with min-max over trials, ratios against the full
pull of the same run, failed trials listed but kept out of the figures, goals as figures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import startup
from bench.startup_report import load, write_report
from bench.startup_workloads import FULL, LAZY, LAZY_PROFILE, WORKLOADS_BY_NAME, TrialResult

COMMAND = "/opt/lazysnap-venv/bin/python -m bench.startup --trials 3"


def _trial(
    workload: str, mode: str, trial: int, pull: float, first: float, **extra: object
) -> dict[str, object]:
    result = TrialResult(
        "r1",
        "loopback",
        trial,
        workload,
        mode,
        pull_s=pull,
        first_run_s=first,
        pull_first_run_s=pull + first,
        second_run_s=0.2,
        bytes_total=10_000_000,
    )
    record = asdict(result)
    record.update(extra)
    return record


def _write(path: Path, trials: list[dict[str, object]]) -> Path:
    header = {
        "kind": "run",
        "run_id": "r1",
        "command": COMMAND,
        "trials": 3,
        "inflate_mb_s": 600.0,
        "seqread_data_layer_bytes": 80_000_000,
    }
    link = {
        "kind": "link",
        "link": "loopback",
        "description": "loopback",
        "rtt_ms": 0.03,
        "get_mb_s": 500.0,
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, link, *trials]))
    return path


def test_report_gives_median_range_and_ratio_and_lists_failures(tmp_path: Path) -> None:
    trials = [_trial("py-import", FULL, n, pull, 1.0) for n, pull in ((1, 9), (2, 11), (3, 13))]
    trials += [_trial("py-import", LAZY, n, pull, 1.0) for n, pull in ((1, 0.2), (2, 1.0), (3, 8))]
    trials.append(_trial("py-import", LAZY, 4, 500.0, 1.0, error="ctr run failed: boom"))
    report = write_report(_write(tmp_path / "results.jsonl", trials), tmp_path)
    text = report.read_text()
    assert f"Command: `{COMMAND}`" in text
    assert (
        "| python `import numpy, pandas` | pull + first run s | 12.00 [10.00-14.00] | "
        "2.00 [1.20-9.00] | 0.17x |" in text
    )
    assert "- loopback trial 4 py-import lazysnap: ctr run failed: boom" in text
    assert "501" not in text  # the failed trial's figures are not in any statistic
    assert (
        "| pull + import numpy,pandas <= 0.1x full pull | loopback | lazysnap | 2.00 s vs "
        "12.00 s = 0.17x | no |" in text
    )
    png = tmp_path / "startup-loopback.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "![loopback](startup-loopback.png)" in text


def test_goals_report_met_figures(tmp_path: Path) -> None:
    trials = [_trial("py-print", LAZY, 1, 0.5, 0.4), _trial("py-print", FULL, 1, 9.0, 0.4)]
    trials += [
        _trial(
            "seqread", mode, 1, 1.0, 1.0, read_bytes=200_000_000, read_cold_s=cold, read_warm_s=0.05
        )
        for mode, cold in ((FULL, 0.1), (LAZY, 1.0))
    ]
    text = write_report(_write(tmp_path / "results.jsonl", trials), tmp_path).read_text()
    assert "| pull + print(1) <= 1.5 s | loopback | lazysnap | 0.90 s | yes |" in text
    # 200 MB in 1 s against min(500 MB/s of 2.5x compressed data, inflate 600 MB/s).
    assert (
        "| cold sequential read >= 50% of min(link, inflate) | loopback | lazysnap | 200 MB/s vs "
        "min(link 500 x 2.50 compression = 1250, inflate 600) = 33% | no |" in text
    )
    assert (
        "| warm read >= 90% of overlayfs | loopback | lazysnap | 4000 vs 4000 MB/s = 100% | yes |"
        in text
    )


def test_profile_configuration_gets_its_own_column_ratio_and_bytes_goal(tmp_path: Path) -> None:
    trials = [
        _trial("py-import", FULL, 1, 8.0, 1.0, bytes_first_run=244_000_000),
        _trial("py-import", LAZY, 1, 0.8, 1.9, bytes_first_run=70_000_000),
        _trial("py-import", LAZY_PROFILE, 1, 0.8, 0.5, bytes_first_run=84_000_000),
    ]
    text = write_report(_write(tmp_path / "results.jsonl", trials), tmp_path).read_text()
    assert (
        "| workload | metric | full pull (overlayfs) | lazysnap | lazysnap + profile | "
        "lazysnap / full | lazysnap + profile / full |" in text
    )
    assert (
        "| python `import numpy, pandas` | pull + first run s | 9.00 | 2.70 | 1.30 | 0.30x | "
        "0.14x |" in text
    )
    # the profiled run fetched 84 MB where on-demand reads needed 70 MB of spans
    assert (
        "| bytes fetched <= 1.5x spans read (py-import) | loopback | lazysnap + profile | "
        "84.0 MB vs 70.0 MB of spans read = 1.20x | yes |" in text
    )
    assert (
        "| pull + import numpy,pandas <= 0.1x full pull | loopback | lazysnap + profile | "
        "1.30 s vs 9.00 s = 0.14x | no |" in text
    )


def test_converged_run_and_read_are_reported_against_the_full_pulls_third_run(
    tmp_path: Path,
) -> None:
    trials = [
        _trial(
            "seqread",
            mode,
            1,
            1.0,
            1.0,
            read_bytes=200_000_000,
            read_cold_s=0.5,
            read_warm_s=0.05,
            converged_run_s=run,
            read_converged_s=read,
            converge_s=converge,
        )
        for mode, run, read, converge in ((FULL, 0.2, 0.04, None), (LAZY, 0.21, 0.042, 12.5))
    ]
    text = write_report(_write(tmp_path / "results.jsonl", trials), tmp_path).read_text()
    assert "| sequential read | layers local after s | - | 12.5 | - |" in text
    assert (
        "| converged run <= 1.1x full (seqread) | loopback | lazysnap | 0.210 s vs 0.200 s = "
        "1.05x | yes |" in text
    )
    assert (
        "| converged read >= 90% of overlayfs | loopback | lazysnap | 4762 vs 5000 MB/s = 95% "
        "| yes |" in text
    )


def test_each_trial_rotates_the_configurations_and_busybox_has_no_profile() -> None:
    chosen = [FULL, LAZY, LAZY_PROFILE]
    py_import = WORKLOADS_BY_NAME["py-import"]
    orders = [startup.trial_modes(py_import, chosen, trial) for trial in (1, 2, 3)]
    assert [order[0] for order in orders] == [FULL, LAZY, LAZY_PROFILE]
    assert all(sorted(order) == sorted(chosen) for order in orders)
    busybox = WORKLOADS_BY_NAME["busybox-echo"]
    assert startup.trial_modes(busybox, chosen, 1) == [FULL, LAZY]
    assert startup.trial_modes(py_import, [FULL, LAZY_PROFILE], 2) == [LAZY_PROFILE, FULL]


def test_load_names_file_and_line_of_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"kind": "run"}\n{not json\n')
    with pytest.raises(ValueError, match=r"results\.jsonl:2: not JSON"):
        load(path)


def test_report_only_mode_names_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert startup.main(["--report", str(missing)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err


def test_unknown_link_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        startup.parse_args(["--links", "loopback,wan"])
    assert "unknown wan" in capsys.readouterr().err


def test_quick_is_a_small_smoke_run() -> None:
    args = startup.parse_args(["--quick"])
    assert (args.trials, args.links, args.seqread_mb) == (1, ["loopback"], 40)
    full = startup.parse_args([])
    assert (full.trials, full.links, len(full.workloads)) == (3, ["loopback", "shaped"], 4)
