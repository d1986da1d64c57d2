"""Docker credential helpers run by CredentialStore: a fake `docker-credential-*` script on PATH
plays every answer a helper can give (the real `docker-credential-pass` against a registry is
in test_remote_credential_pass.py). The fake records each run (the server URL it was asked
for) in a file, so the cache is observed from outside."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.errors import CredentialsError
from tests.remote.conftest import LogRecorder

SECRET = "s3cret-Value-never-logged"

FAKE_HELPER = """#!/bin/sh
read -r url || true
echo "$url" >> "$FAKE_HELPER_RUNS"
user="user-of-$(basename "$0")"
case "$FAKE_HELPER_MODE" in
ok) printf '{"ServerURL":"%s","Username":"%s","Secret":"%s"}\\n' "$url" "$user" "$FAKE_SECRET" ;;
token) printf '{"ServerURL":"%s","Username":"<token>","Secret":"%s"}\\n' "$url" "$FAKE_SECRET" ;;
notfound) echo "credentials not found in native keychain"; exit 1 ;;
fail) echo "gpg: decryption failed: No secret key" >&2; exit 3 ;;
hang) sleep 60 ;;
garbage) echo "{\\"Username\\": \\"$FAKE_SECRET"; exit 0 ;;
esac
"""


class Fake:
    def __init__(self, bin_dir: Path, runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs_file = runs
        self._monkeypatch = monkeypatch
        for name in ("fake", "other"):
            script = bin_dir / f"docker-credential-{name}"
            script.write_text(FAKE_HELPER)
            script.chmod(0o755)

    def mode(self, mode: str) -> None:
        self._monkeypatch.setenv("FAKE_HELPER_MODE", mode)

    @property
    def runs(self) -> list[str]:
        return self.runs_file.read_text().splitlines() if self.runs_file.exists() else []


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = tmp_path / "runs.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_HELPER_RUNS", str(runs))
    monkeypatch.setenv("FAKE_SECRET", SECRET)
    helper = Fake(bin_dir, runs, monkeypatch)
    helper.mode("ok")
    return helper


def store_for(tmp_path: Path, doc: dict[str, object], **options: Any) -> CredentialStore:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return CredentialStore.from_docker_config(path, **options)


def inline(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def warnings_of(logs: LogRecorder) -> list[str]:
    return [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]


def test_helper_credentials_and_the_server_url_docker_passes(
    fake: Fake, tmp_path: Path, logs: LogRecorder
) -> None:
    store = store_for(tmp_path, {"credsStore": "fake"})
    assert store.get("127.0.0.1:5000") == Credentials("user-of-docker-credential-fake", SECRET)
    assert store.get("registry-1.docker.io") == Credentials(
        "user-of-docker-credential-fake", SECRET
    )
    assert fake.runs == ["127.0.0.1:5000", "https://index.docker.io/v1/"]
    assert SECRET not in logs.text and not warnings_of(logs)


def test_identity_token_not_found_failure_and_garbage_leave_the_host_anonymous(
    fake: Fake, tmp_path: Path, logs: LogRecorder
) -> None:
    cases = {
        "token": "identity token",
        "notfound": None,
        "fail": "exited with status 3: gpg: decryption failed: No secret key",
        "garbage": "answered something that is not JSON",
    }
    for mode, warning in cases.items():
        fake.mode(mode)
        before = len(warnings_of(logs))
        assert store_for(tmp_path, {"credsStore": "fake"}).get("r.example") is None, mode
        new = warnings_of(logs)[before:]
        if warning is None:
            assert new == [], mode
        else:
            [line] = new
            assert warning in line and "docker-credential-fake" in line and "r.example" in line
    assert len(fake.runs) == len(cases)
    assert SECRET not in logs.text


def test_missing_helper_is_one_warning_and_anonymous(
    fake: Fake, tmp_path: Path, logs: LogRecorder
) -> None:
    store = store_for(tmp_path, {"credHelpers": {"r.example": "absent"}})
    assert store.get("r.example") is None
    assert store.get("r.example") is None  # the failure is cached: no second attempt, no log
    [line] = warnings_of(logs)
    assert "docker-credential-absent is not on PATH" in line and "r.example" in line


def test_a_hanging_helper_is_killed_at_the_timeout(
    fake: Fake, tmp_path: Path, logs: LogRecorder
) -> None:
    fake.mode("hang")
    store = store_for(tmp_path, {"credsStore": "fake"}, helper_timeout=1.0)
    started = time.monotonic()
    assert store.get("r.example") is None
    assert time.monotonic() - started < 1.0 + 3.0
    [line] = warnings_of(logs)
    assert "did not answer within 1 s" in line


def test_precedence_is_the_hosts_helper_then_creds_store_then_auths(
    fake: Fake, tmp_path: Path
) -> None:
    doc: dict[str, object] = {
        "credHelpers": {"ecr.example": "other"},
        "credsStore": "fake",
        "auths": {"ecr.example": inline("a", "b"), "hub.example": inline("c", "d")},
    }
    store = store_for(tmp_path, doc)
    assert store.get("ecr.example") == Credentials("user-of-docker-credential-other", SECRET)
    assert store.get("hub.example") == Credentials("user-of-docker-credential-fake", SECRET)
    # Where the helper has nothing or fails, the auths entry is used (docker would go
    # anonymous or fail the pull); without one, the host is anonymous.
    for mode in ("notfound", "fail"):
        fake.mode(mode)
        assert store_for(tmp_path, doc).get("hub.example") == Credentials("c", "d"), mode
        assert store_for(tmp_path, doc).get("elsewhere.example") is None, mode
    # Without any helper, auths is used and nothing runs.
    runs = len(fake.runs)
    assert store_for(tmp_path, {"auths": doc["auths"]}).get("ecr.example") == Credentials("a", "b")
    assert len(fake.runs) == runs


def test_answers_are_cached_per_host_until_they_expire(fake: Fake, tmp_path: Path) -> None:
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    store = store_for(
        tmp_path, {"credsStore": "fake"}, clock=clock, answer_ttl=300.0, failure_ttl=30.0
    )
    assert store.get("a.example") is not None and store.get("a.example") is not None
    assert store.get("b.example") is not None
    assert fake.runs == ["a.example", "b.example"]
    now[0] += 301
    fake.mode("fail")
    assert store.get("a.example") is None
    now[0] += 29
    assert store.get("a.example") is None  # the failure is reused for 30 s
    now[0] += 2
    fake.mode("ok")
    assert store.get("a.example") is not None
    assert fake.runs == ["a.example", "b.example", "a.example", "a.example"]


def test_a_helper_name_that_is_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"credsStore is not a credential helper name"):
        store_for(tmp_path, {"credsStore": "../../bin/sh"})
    with pytest.raises(CredentialsError, match=r"credHelpers\['r.io'\]"):
        store_for(tmp_path, {"credHelpers": {"r.io": "a b"}})
    assert store_for(tmp_path, {"credsStore": ""}).get("r.io") is None  # empty: no helper
