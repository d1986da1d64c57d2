"""The completion check without a stack: the TOC comparison names each differing field, and
check_layer (over a real span cache filled the way a reader fills it) passes a genuine index
and fails every forgery of harness/forge.py, naming what differed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness import forge
from snapshotter.fs.cache import SpanCache
from snapshotter.index.codec import decode_window, encode_index_split
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import inflate_span
from snapshotter.index.toc_compare import TOC_FIELDS, first_difference
from snapshotter.lazylayers.completion import (
    FAILED,
    INCOMPLETE,
    PASSED,
    CheckReport,
    Pacer,
    check_layer,
)
from snapshotter.lazylayers.refusals import RefusalLedger, RefusedIndex
from tests.fs.fs_helpers import Member, built_index, compress, make_tar, rich_members

ENTRY = TocEntry(
    "usr/bin/tool",
    EntryType.REG,
    0o600,
    uid=1,
    gid=2,
    uname="u",
    gname="g",
    size=10,
    mtime_ns=5,
    offset=512,
    xattrs={"user.a": b"1"},
)
OTHER_VALUES: dict[str, object] = {
    "name": "usr/bin/other",
    "type": EntryType.HARDLINK,
    "mode": 0o644,
    "uid": 0,
    "gid": 0,
    "uname": "root",
    "gname": "root",
    "size": 11,
    "mtime_ns": 6,
    "link_target": "x",
    "devmajor": 5,
    "devminor": 1,
    "xattrs": {"user.a": b"2"},
    "offset": 1024,
}


@pytest.mark.parametrize("field", TOC_FIELDS)
def test_each_differing_field_is_named_with_both_values(field: str) -> None:
    changed = dataclasses.replace(ENTRY, **{field: OTHER_VALUES[field]})  # type: ignore[arg-type]
    difference = first_difference([ENTRY, changed], [ENTRY, ENTRY])
    assert difference is not None
    assert difference.startswith(f"entry 1 {ENTRY.name!r}: {field} is "), difference
    if field == "mode":
        assert "0o644 in the index, 0o600 in the tar stream" in difference


def test_identical_tocs_have_no_difference() -> None:
    assert first_difference([ENTRY], [dataclasses.replace(ENTRY)]) is None


def test_an_added_or_missing_entry_is_named() -> None:
    extra = dataclasses.replace(ENTRY, name="etc/anything")
    added = first_difference([ENTRY, extra], [ENTRY])
    assert added is not None and "'etc/anything' (reg) is not in the layer" in added
    missing = first_difference([ENTRY], [ENTRY, extra])
    assert missing is not None and "'etc/anything' (reg) is missing from the index" in missing


# -- check_layer over a real span cache ------------------------------------------------------------


def _members() -> list[Member]:
    # rich_members plus a compressible file spanning several spans, so that later gzip spans
    # reach back into their windows (what forge_window needs)
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(40000))
    return [*rich_members(), Member("usr/share/text", data=text, mode=0o600)]


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes, forge.IndexBlobs]:
    tar = make_tar(_members())
    blob = compress(tar, "gzip")
    index_blob, windows = encode_index_split(built_index(blob, "gzip"))
    return tar, blob, forge.IndexBlobs(index_blob, windows)


def _diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def _fill(cache: SpanCache, index: LayerIndex, blob: bytes, windows: bytes) -> None:
    """Every span inflated and verified against this index, stored as a reader stores it."""
    for number, span in enumerate(index.spans):
        frame = windows[span.window_offset : span.window_offset + span.window_length]
        window = decode_window(frame) if span.window_length else None
        data = inflate_span(
            index, number, blob[span.compressed_start : span.compressed_end], window
        )
        assert cache.put(index.layer_digest, number, data, span.uncompressed_digest)


def _check(
    tmp_path: Path, blob: bytes, blobs: forge.IndexBlobs, diff_id: str, *, fill: bool = True
) -> CheckReport:
    index = blobs.decoded()
    cache = SpanCache(tmp_path / "cache", 1 << 30)
    if fill:
        _fill(cache, index, blob, blobs.windows)
    return check_layer(index, cache, diff_id, chunk=64 << 10)


def test_a_genuine_index_passes(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    tar, blob, genuine = layer
    report = _check(tmp_path, blob, genuine, _diff_id(tar))
    assert report.result == PASSED and report.diff_id_checked, report
    assert report.bytes_checked == genuine.decoded().uncompressed_size


def test_a_wrong_diff_id_fails_naming_both_digests(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    tar, blob, genuine = layer
    wrong = _diff_id(tar + b"x")
    report = _check(tmp_path, blob, genuine, wrong)
    assert report.result == FAILED
    assert f"hashes to {_diff_id(tar)}, the image config's diffID is {wrong}" in report.detail


def test_without_a_diff_id_only_the_toc_is_checked(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    _, blob, genuine = layer
    report = _check(tmp_path, blob, genuine, "")
    assert report.result == PASSED and not report.diff_id_checked
    assert "TOC only" in report.detail


def test_a_missing_span_is_incomplete_not_a_verdict(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    tar, blob, genuine = layer
    report = _check(tmp_path, blob, genuine, _diff_id(tar), fill=False)
    assert report.result == INCOMPLETE and "span 0" in report.detail


def _forgeries(blobs: forge.IndexBlobs, blob: bytes) -> dict[str, forge.IndexBlobs]:
    return {
        "remap": forge.remap(blobs, "etc/hosts", "etc/shadow"),
        "mode": forge.change_mode(blobs, "usr/share/text", 0o644),
        "setuid+device": forge.add_setuid_and_device(blobs),
        "added path": forge.add_path(blobs),
        "window": forge.forge_window(blobs, blob)[0],
    }


@pytest.mark.parametrize(
    ("forgery", "named"),
    [
        ("remap", "'etc/hosts': name is 'etc/shadow' in the index, 'etc/hosts' in the tar stream"),
        ("mode", "'usr/share/text': mode is 0o644 in the index, 0o600 in the tar stream"),
        ("setuid+device", "'usr/bin/forged-suid' (reg) is not in the layer"),
        ("added path", "'etc/anything' (reg) is not in the layer"),
        ("window", "the uncompressed layer hashes to sha256:"),
    ],
)
def test_every_forgery_fails_naming_what_differed(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path, forgery: str, named: str
) -> None:
    tar, blob, genuine = layer
    forged = _forgeries(genuine, blob)[forgery]
    assert forged.index_digest != genuine.index_digest
    report = _check(tmp_path, blob, forged, _diff_id(tar))
    assert report.result == FAILED, report
    assert named in report.detail, report.detail


def test_the_helper_process_reports_one_json_line(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    """What the daemon runs: `python -m snapshotter.lazylayers.completion --spec FILE`."""
    tar, blob, genuine = layer
    forged = forge.change_mode(genuine, "usr/share/text", 0o644)
    cache = SpanCache(tmp_path / "cache", 1 << 30)
    _fill(cache, forged.decoded(), blob, forged.windows)
    (tmp_path / "index").write_bytes(forged.index)
    spec = {
        "mountpoint": str(tmp_path / "fs"),
        "index_path": str(tmp_path / "index"),
        "blob": {"kind": "file", "location": "/dev/null"},
        "cache_dir": str(tmp_path / "cache"),
        "cache_max_bytes": 1 << 30,
        "diff_id": _diff_id(tar),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapshotter.lazylayers.completion",
            "--spec",
            str(tmp_path / "spec.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = CheckReport.from_json(json.loads(done.stdout))
    assert report.result == FAILED and "mode is 0o644 in the index" in report.detail


def test_evict_layer_removes_every_span_of_the_layer_and_only_those(
    layer: tuple[bytes, bytes, forge.IndexBlobs], tmp_path: Path
) -> None:
    _, blob, genuine = layer
    index = genuine.decoded()
    cache = SpanCache(tmp_path / "cache", 1 << 30)
    _fill(cache, index, blob, genuine.windows)
    other = "sha256:" + "ab" * 32
    assert cache.put(other, 0, b"kept", "sha256:" + hashlib.sha256(b"kept").hexdigest())
    assert cache.evict_layer(index.layer_digest) == len(index.spans)
    assert not any(cache.contains(index.layer_digest, n) for n in range(len(index.spans)))
    assert cache.usage().spans == 1 and cache.approximate_usage().spans == 1


def test_the_ledger_keeps_refusals_and_counts_across_instances(tmp_path: Path) -> None:
    ledger = RefusalLedger(str(tmp_path))
    ledger.record_pass()
    ledger.record_refusal(RefusedIndex("sha256:" + "1" * 64, "sha256:" + "2" * 64, "mode"))
    again = RefusalLedger(str(tmp_path))  # another process: the daemon after a restart
    refused = again.refused("sha256:" + "1" * 64)
    assert refused is not None and refused.why == "mode"
    assert again.refused("sha256:" + "3" * 64) is None
    assert again.counts() == {"passed": 1, "failed": 1}


class _PacedClock:
    """A clock whose waits pass at once, each recorded (the pacer waits on no event)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waited: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.waited.append(timeout)
        self.now += timeout
        return False


def test_the_pacer_holds_the_check_to_its_rate() -> None:
    clock = _PacedClock()
    pacer = Pacer(100, clock=clock)
    pacer.account(50)  # 0.5 s worth at 100 B/s, done instantly: wait the rest
    clock.now += 0.2  # work that took longer than its share
    pacer.account(10)
    pacer.account(100)
    assert clock.waited == [0.5, pytest.approx(0.9)]
    assert clock.now == pytest.approx(1.6)  # 160 bytes at 100 B/s
