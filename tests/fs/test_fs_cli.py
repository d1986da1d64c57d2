"""`python -m snapshotter.fs.mount_process`: bad input gets one clear line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from snapshotter.index.codec import encode_index
from tests.fs.fs_helpers import built_index, make_tar, rich_members

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.fs.mount_process", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        env={"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"},
    )


def test_missing_options_are_named() -> None:
    result = _run("--index", "/nonexistent")
    assert result.returncode == 2
    assert "missing --mountpoint, --blob-file, --cache-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_with_a_bad_key_names_file_and_key(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"mountpoint": str(tmp_path), "index_path": "x", "blob": {}}))
    result = _run("--spec", str(spec))
    assert result.returncode == 2
    assert f"mount spec {spec}: blob.kind: None is not one of file, registry" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_index_for_another_blob_is_refused_before_mounting(tmp_path: Path) -> None:
    tar = make_tar(rich_members())
    index_file = tmp_path / "index"
    index_file.write_bytes(encode_index(built_index(tar, "tar")))
    (tmp_path / "blob").write_bytes(tar)
    (tmp_path / "mnt").mkdir()
    spec = {
        "mountpoint": str(tmp_path / "mnt"),
        "index_path": str(index_file),
        "blob": {
            "kind": "file",
            "location": str(tmp_path / "blob"),
            "digest": "sha256:" + "0" * 64,
        },
        "cache_dir": str(tmp_path / "cache"),
        "cache_max_bytes": 1 << 20,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = _run("--spec", str(tmp_path / "spec.json"))
    assert result.returncode == 2
    assert "not blob sha256:" + "0" * 64 in result.stderr
    assert "Traceback" not in result.stderr
