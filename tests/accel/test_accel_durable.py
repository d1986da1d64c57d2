"""The acceleration service's jobs outlive the process, and Harbor talks to it through
acceld's route: a real docker-registry 2.8, `lazysnap accel serve` processes, SIGKILL."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from accel_helpers import (
    CONVERSIONS,
    AccelProcess,
    distribution_envelope,
    harbor_push,
    start_accel,
)

from harness.images import BuiltImage, file, layer_tar, push, write_oci_layout
from harness.procs import HarnessError
from harness.registry import Registry, start_registry
from harness.trust import SigningKeys

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "accel-durable-token-0123456789"
LAZYSNAP = (sys.executable, "-m", "snapshotter.cli")
FLAGS = ("--plain-http", "--min-layer-size", "0", "--span-size", "65536", "--layer-jobs", "1")


@dataclass
class Env:
    base: Path
    registry: Registry
    env: dict[str, str]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="lzs-accel-durable-"))
    environ = {**os.environ, "DOCKER_CONFIG": str(base / "docker-config")}
    try:
        registry = start_registry(base / "registry")  # no notifications: tests send webhooks
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield Env(base, registry, environ)
    registry.stop()
    shutil.rmtree(base, ignore_errors=True)


def pushed_image(env: Env, repository: str, tag: str = "v1") -> BuiltImage:
    name = secrets.token_hex(4)
    tars = [layer_tar([file(f"{name}/l{i}.bin", os.urandom(120_000))]) for i in range(2)]
    image = write_oci_layout(env.base / "layouts" / name, tag, tars)
    push(image, env.registry.host, repository, tag)
    return image


def lazysnap(env: Env, *args: str) -> str:
    result = subprocess.run(
        [*LAZYSNAP, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env.env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def artifact_of(env: Env, reference: str, keys: SigningKeys) -> dict[str, Any]:
    """The image's index artifact as a node trusting the session key sees it."""
    shown = lazysnap(
        env, "index", "show", reference, "--plain-http", "--json", "--key", str(keys.public)
    )
    [platform] = json.loads(shown)["platforms"]
    artifact: dict[str, Any] = platform["artifact"]
    return artifact


def succeeded(accel: AccelProcess, count: int) -> list[dict[str, Any]] | None:
    tasks = accel.tasks("succeeded")
    return tasks if len(tasks) >= count else None


def test_a_killed_service_indexes_the_webhooks_it_answered_after_a_restart(
    env: Env, index_signing_keys: SigningKeys
) -> None:
    store = env.base / f"kill-{secrets.token_hex(3)}" / "jobs.sqlite"
    flags = (*FLAGS, "--jobs", "1", "--store", str(store))
    images = {f"killed/app{n}": pushed_image(env, f"killed/app{n}") for n in range(4)}
    first = start_accel(env.base / "first", flags, token=TOKEN, env=env.env)
    for repository, image in images.items():
        body = distribution_envelope(env.registry.host, repository, image.manifest_digest, "v1")
        answer = first.request("POST", "/events", body)
        assert answer.status == 202 and len(answer.body["queued"]) == 1, answer
    first.service.send_signal(signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL

    # What the dead service left: four tasks, not all of them done.
    left = json.loads(lazysnap(env, "accel", "tasks", "--store", str(store), "--json"))
    assert len(left) == 4
    assert [t for t in left if t["status"] != "succeeded"], left

    second = start_accel(env.base / "second", flags, token=TOKEN, env=env.env)
    try:
        tasks = second.wait_for("four succeeded tasks", lambda: succeeded(second, 4), timeout=120)
        assert sorted(t["image"].split("@")[1] for t in tasks) == sorted(
            image.manifest_digest for image in images.values()
        )
        assert {t["outcome"] for t in tasks} <= {"indexed", "already indexed"}
        assert re.search(r"job store .*jobs\.sqlite: \d queued, \d interrupted", second.log())
        for repository, image in images.items():
            reference = f"{env.registry.host}/{repository}@{image.manifest_digest}"
            artifact = artifact_of(env, reference, index_signing_keys)
            assert artifact["trusted"] is True, artifact  # signed with the service's key
        table = lazysnap(
            env,
            *("accel", "tasks", "--url", second.url, "--status", "succeeded"),
            *("--token-file", str(accel_token(second))),
        )
        assert table.count("succeeded") == 4
    finally:
        assert second.stop() == 0
    assert "Traceback" not in second.log()


def test_harbor_payloads_through_acceld_s_route(env: Env, index_signing_keys: SigningKeys) -> None:
    flags = (*FLAGS, "--jobs", "2")
    accel = start_accel(
        env.base / f"harbor-{secrets.token_hex(3)}", flags, token=TOKEN, env=env.env
    )
    try:
        classic_repo, cloud_repo = "harbor/classic", "harbor/cloud"
        classic = pushed_image(env, classic_repo)
        cloud = pushed_image(env, cloud_repo)

        # Default format, ?sync=true: the answer comes when the task is done.
        body = harbor_push(env.registry.host, classic_repo, "v1", classic.manifest_digest)
        answer = accel.request("POST", f"{CONVERSIONS}?sync=true", body)
        assert answer.status == 200, answer
        [task] = answer.body["tasks"]
        assert task["status"] == "succeeded" and task["outcome"] == "indexed", task
        assert task["image"] == f"{env.registry.host}/{classic_repo}@{classic.manifest_digest}"
        assert task["finished"] is not None and task["artifacts"]
        reference = f"{env.registry.host}/{classic_repo}@{classic.manifest_digest}"
        assert artifact_of(env, reference, index_signing_keys)["digest"] == task["artifacts"][0]

        # CloudEvents format, asynchronous: answered at once, done later.
        body = harbor_push(
            env.registry.host, cloud_repo, "v1", cloud.manifest_digest, cloudevents=True
        )
        answer = accel.request("POST", CONVERSIONS, body)
        assert answer.status == 200, answer
        [queued] = answer.body["tasks"]
        assert queued["status"] in ("queued", "running", "succeeded")
        accel.wait_for("the CloudEvents task", lambda: succeeded(accel, 2))

        # acceld's own documented request: a resource_url with a tag, no digest.
        tag_only = pushed_image(env, "harbor/tag-only")
        body = json.dumps(
            {
                "type": "PUSH_ARTIFACT",
                "event_data": {
                    "resources": [{"resource_url": f"{env.registry.host}/harbor/tag-only:v1"}]
                },
            }
        ).encode()
        answer = accel.request("POST", f"{CONVERSIONS}?sync=true", body)
        assert answer.status == 200, answer
        [resolved] = answer.body["tasks"]
        assert resolved["image"].endswith(f"harbor/tag-only@{tag_only.manifest_digest}")
        assert resolved["status"] == "succeeded", resolved
        gone = body.replace(b":v1", b":no-such-tag")
        answer = accel.request("POST", CONVERSIONS, gone)
        assert answer.status == 200 and answer.body["tasks"] == [] and answer.body["skipped"] == 1

        listed = [t for t in accel.tasks() if t["id"] != resolved["id"]]
        assert [t["id"] for t in listed] == [queued["id"], task["id"]]  # newest first
        for entry in listed:
            assert set(entry) >= {"id", "image", "status", "reason", "created", "finished"}
        assert accel.tasks("failed") == [] and len(accel.tasks("succeeded,failed")) == 3
        assert accel.raw("GET", f"{CONVERSIONS}?status=done")[0] == 400
        assert [t["id"] for t in accel.tasks("succeeded&limit=1")] == [resolved["id"]]
        assert accel.raw("GET", f"{CONVERSIONS}?limit=0")[0] == 400
        assert accel.raw("GET", "/api/v1/health") == (200, b"Ok")
        metrics = accel.raw("GET", "/metrics")[1].decode()
        assert 'lazysnap_accel_jobs{status="succeeded"} 3.0' in metrics
        assert 'lazysnap_accel_jobs_finished_total{outcome="indexed"} 3.0' in metrics
        assert "lazysnap_accel_bytes_read_total" in metrics

        as_cli = json.loads(
            lazysnap(
                env,
                "accel",
                "tasks",
                "--url",
                accel.url,
                "--json",
                "--token-file",
                str(accel_token(accel)),
            )
        )
        assert as_cli == accel.tasks()
        unauthorized = subprocess.run(
            [*LAZYSNAP, "accel", "tasks", "--url", accel.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
        assert unauthorized.returncode == 1 and "HTTP 401" in unauthorized.stderr
    finally:
        assert accel.stop() == 0
    assert "Traceback" not in accel.log()


def accel_token(accel: AccelProcess) -> Path:
    return accel.log_path.parent / "token"


def test_sigterm_drains_running_jobs_finish_and_queued_ones_wait_in_the_store(
    env: Env,
) -> None:
    store = env.base / f"drain-{secrets.token_hex(3)}" / "jobs.sqlite"
    flags = (*FLAGS, "--jobs", "1", "--store", str(store))
    repository = "drain/app"  # one repository: its jobs run one after the other
    images = [pushed_image(env, repository, f"v{n}") for n in range(3)]
    first = start_accel(env.base / "drain-first", flags, token=TOKEN, env=env.env)
    for n, image in enumerate(images):
        body = distribution_envelope(env.registry.host, repository, image.manifest_digest, f"v{n}")
        assert first.request("POST", "/events", body).status == 202
    running = first.wait_for("a running job", lambda: first.status()["running"])
    assert first.stop() == 0  # SIGTERM

    left = json.loads(lazysnap(env, "accel", "tasks", "--store", str(store), "--json"))
    by_id = {task["id"]: task for task in left}
    assert by_id[str(running[0]["id"])]["status"] == "succeeded"  # it was let finish
    assert "running" not in {task["status"] for task in left}
    assert [t for t in left if t["status"] == "queued"], left  # kept, not dropped
    assert re.search(r"draining: [12] queued job\(s\) stay in job store", first.log())

    second = start_accel(env.base / "drain-second", flags, token=TOKEN, env=env.env)
    try:
        second.wait_for("all three succeeded", lambda: succeeded(second, 3), timeout=120)
    finally:
        assert second.stop() == 0


def test_reconcile_queues_the_images_a_missed_webhook_left_unindexed(env: Env) -> None:
    repository = f"recon{secrets.token_hex(2)}/app"
    images = [pushed_image(env, repository, f"v{n}") for n in range(2)]
    flags = [*FLAGS, "--jobs", "1", "--reconcile", f"{env.registry.host}/{repository}"]
    flags += ["--reconcile-interval", "1", "--reconcile-rate", "20"]
    accel = start_accel(env.base / f"recon-{secrets.token_hex(3)}", flags, token=TOKEN, env=env.env)
    try:
        tasks = accel.wait_for("both images indexed", lambda: succeeded(accel, 2), timeout=120)
        assert sorted(t["image"].split("@")[1] for t in tasks) == sorted(
            image.manifest_digest for image in images
        )
        assert {t["outcome"] for t in tasks} == {"indexed"}
        # Later passes find the indexes (their sha256-<hex> tags) and queue nothing more.
        accel.wait_for(
            "a pass that finds both indexed",
            lambda: re.search(
                r"reconcile pass: \d+ tags: 0 queued, 2 already indexed", accel.log()
            ),
        )
        assert len(accel.tasks()) == 2
    finally:
        assert accel.stop() == 0
    assert "Traceback" not in accel.log()


def test_convert_is_the_one_time_mode_and_prints_task_rows(env: Env) -> None:
    repository = f"once{secrets.token_hex(2)}/app"
    image = pushed_image(env, repository)
    reference = f"{env.registry.host}/{repository}:v1"
    flags = ("--plain-http", "--min-layer-size", "0", "--span-size", "65536", "--json")

    [task] = json.loads(lazysnap(env, "accel", "convert", reference, *flags))
    assert task["status"] == "succeeded" and task["outcome"] == "indexed", task
    assert task["image"] == f"{env.registry.host}/{repository}@{image.manifest_digest}"
    assert task["artifacts"] and task["finished"] is not None and task["reason"] == ""

    missing = f"{env.registry.host}/{repository}:nope"
    result = subprocess.run(
        [*LAZYSNAP, "accel", "convert", reference, missing, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env.env,
    )
    assert result.returncode == 1, result.stderr
    again, failed = json.loads(result.stdout)
    assert again["outcome"] == "already indexed" and again["artifacts"] == task["artifacts"]
    assert failed["status"] == "failed" and failed["image"] == missing
    assert "nope" in failed["reason"]
    # The same row shape as the service's task list.
    assert set(task) == set(again) == set(failed)
