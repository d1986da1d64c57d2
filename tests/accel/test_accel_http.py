"""`lazysnap accel serve` as a process, without a registry: flags and files it refuses, the
HTTP surface (auth, bad bodies, routes), clean stop on SIGTERM."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from accel_helpers import AccelProcess, accel_command, distribution_envelope, start_accel

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "webhook-secret-0123"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lzs-accel-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def accel(workdir: Path) -> Iterator[AccelProcess]:
    process = start_accel(workdir, ["--plain-http"], token=TOKEN)
    yield process
    process.stop()


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    state = tempfile.mkdtemp(prefix="lzs-accel-state-")  # never the host's /var/lib
    try:
        return subprocess.run(
            [*accel_command(), "--state-dir", state, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "localhost"], "invalid --listen 'localhost'"),
        (["--listen", "1.2.3.4:99999"], "invalid --listen"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--retry-backoff", "-1"], "seconds must be within"),
        (["--lease", "0.5"], "--lease must be at least 1 second"),
        (["--reconcile", "Bad Repo"], "invalid --reconcile 'Bad Repo'"),
        (["--cache-repo", "Bad/Repo"], "invalid --cache-repo 'Bad/Repo'"),
        (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token: cannot read"),
        (["--hosts-dir", "/nonexistent/dir"], "--hosts-dir /nonexistent/dir: not a directory"),
    ],
)
def test_bad_flags_and_files_are_named(args: list[str], message: str) -> None:
    result = run_serve("--listen", "127.0.0.1:0", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_token_file_is_refused(workdir: Path) -> None:
    token = workdir / "token"
    token.write_text("\n")
    result = run_serve("--listen", "127.0.0.1:0", "--token-file", str(token))
    assert result.returncode == 2
    assert f"--token-file {token}: the file is empty" in result.stderr


def test_a_store_that_cannot_be_opened_is_named(workdir: Path) -> None:
    unreachable = run_serve("--store", "postgresql://nobody:secret@127.0.0.1:9/none")
    assert unreachable.returncode == 1, unreachable.stderr
    assert "--store: job store postgresql://nobody@127.0.0.1:9/none: cannot connect" in (
        unreachable.stderr
    )
    assert "secret" not in unreachable.stderr and "Traceback" not in unreachable.stderr
    (workdir / "state").mkdir()
    busy = start_accel(workdir, ["--state-dir", str(workdir / "state")])
    try:
        second = run_serve("--state-dir", str(workdir / "state"))
    finally:
        busy.stop()
    assert second.returncode == 1
    assert "another `lazysnap accel serve` uses it" in second.stderr


def test_a_taken_port_is_reported_not_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"--listen 127.0.0.1:{port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_lazysnap_serve_does_not_load_the_acceleration_service() -> None:
    probe = (
        "import sys\n"
        "from snapshotter.cli import build_parser\n"
        "build_parser().parse_args(['serve'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('snapshotter.accel.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "['snapshotter.accel.command']"


def test_health_and_status_answer(accel: AccelProcess) -> None:
    health = accel.request("GET", "/healthz", token="")
    assert health.status == 200 and health.body == {"status": "ok"}
    status = accel.status()
    assert set(status) == {"queued", "running", "done", "failed", "counts"}
    assert status["counts"]["received"] == 0


def test_missing_or_wrong_token_is_401_for_events_and_status(accel: AccelProcess) -> None:
    body = json.dumps({"events": []}).encode()
    for token in ("", "wrong-token"):
        answer = accel.request("POST", "/events", body, token=token)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert accel.request("GET", "/status", token=token).status == 401
    assert accel.request("POST", "/events", body).status == 202


def test_bodies_that_are_no_notification_get_400_naming_the_problem(accel: AccelProcess) -> None:
    answer = accel.request("POST", "/events", b"{not json")
    assert answer.status == 400 and "not JSON" in answer.body["error"]
    answer = accel.request("POST", "/events", b'{"hello": 1}')
    assert answer.status == 400 and "neither 'events'" in answer.body["error"]
    assert accel.request("GET", "/healthz").status == 200  # still serving


def test_oversized_bodies_and_unknown_paths(accel: AccelProcess) -> None:
    with socket.create_connection(("127.0.0.1", accel.port), timeout=10) as conn:
        conn.sendall(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert conn.recv(200).startswith(b"HTTP/1.1 413")
    assert accel.request("POST", "/elsewhere", b"{}").status == 404
    assert accel.request("GET", "/elsewhere").status == 404


def test_sigterm_stops_cleanly(workdir: Path) -> None:
    process = start_accel(workdir / "stop", [])
    assert process.stop() == 0
    assert "stopping" in process.log()
    assert "Traceback" not in process.log()


def test_json_logs_carry_the_job_id(workdir: Path) -> None:
    process = start_accel(
        workdir / "json", ["--log-format", "json", "--max-attempts", "1"], token=TOKEN
    )
    try:
        # A registry nobody listens on: the job fails at once, and says so.
        body = distribution_envelope("127.0.0.1:9", "team/app", "sha256:" + "ab" * 32, "v1")
        answer = process.request("POST", "/events", body)
        assert answer.status == 202
        process.wait_for("the job's failure", lambda: '"level": "error"' in process.log())
    finally:
        process.stop()
    lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    about_job = [line for line in lines if line.get("job") == 1]
    assert {line["level"] for line in about_job} >= {"info", "error"}, lines
    assert all(line["msg"].startswith("job 1: ") for line in about_job)
    assert {"time", "level", "logger", "msg"} <= set(lines[0])
