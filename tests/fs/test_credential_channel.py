"""fs/credential_channel.py: an image's pull credentials reach a process started plainly (the
manager's path without the zygote) through an inherited pipe, for that repository only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from snapshotter.fs.credential_channel import open_channel
from snapshotter.remote.session_credentials import PullAuth, SessionCredentials

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from snapshotter.fs import credential_channel
from snapshotter.remote.reference import Repository
credential_channel.receive(int(sys.argv[1]))
for name in sys.argv[2:]:
    store = credential_channel.credentials_for(Repository.parse(name))
    host, _, repo = name.partition("/")
    auth = store.get(host, repo) if store is not None else None
    print(name, auth.username if auth else "-", auth.password if auth else "-")
"""


def spec(tmp_path: Path, location: str, kind: str = "registry") -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"blob": {"kind": kind, "location": location}}))
    return str(path)


def test_a_plain_child_reads_them_from_the_fd_for_its_repository_only(tmp_path: Path) -> None:
    session = SessionCredentials(60.0)
    session.put("r.example:5000", "team/app", PullAuth("ann", "s3cret"))
    fd = open_channel(session, spec(tmp_path, "r.example:5000/team/app"))
    assert fd is not None
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(fd),
             "r.example:5000/team/app", "r.example:5000/team/other", "s.example/team/app"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=60, check=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
    finally:
        os.close(fd)
    assert child.stdout.splitlines() == [
        "r.example:5000/team/app ann s3cret",
        "r.example:5000/team/other - -",
        "s.example/team/app - -",
    ]


def test_no_channel_without_credentials_for_the_layer(tmp_path: Path) -> None:
    session = SessionCredentials(60.0)
    session.put("r.example", "team/app", PullAuth("ann", "s3cret"))
    assert open_channel(None, spec(tmp_path, "r.example/team/app")) is None
    assert open_channel(session, spec(tmp_path, "r.example/team/other")) is None
    assert open_channel(session, spec(tmp_path, "/blobs/x", kind="file")) is None
