"""`lazysnap accel serve` behind a real docker-registry 2.8 whose `notifications` endpoint
points at it: pushes (skopeo) get indexed without anyone running `index build`, a re-push
rebuilds nothing, the service's own pushes do not loop, callers with a wrong token are
refused, a broken image fails with its reason while the service keeps going, and a registry
outage is retried."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from accel_helpers import (
    AccelProcess,
    distribution_envelope,
    push_all,
    relabel_layers,
    start_accel,
    write_platform_index,
)

from harness.images import BuiltImage, file, layer_tar, push, write_oci_layout
from harness.procs import HarnessError
from harness.registry import NotificationEndpoint, Registry, start_registry
from snapshotter.remote.signatures import COSIGN_SIGNATURE_ARTIFACT_TYPE

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "accel-test-token-0123456789"
SHOW = (sys.executable, "-m", "snapshotter.cli", "index", "show")
SERVICE_FLAGS = (
    "--plain-http",
    "--min-layer-size",
    "0",
    "--span-size",
    "65536",
    "--jobs",
    "2",
    "--layer-jobs",
    "1",
    "--max-attempts",
    "20",
    "--retry-backoff",
    "0.3",
)


@dataclass
class Stack:
    base: Path
    accel: AccelProcess
    registry: Registry
    env: dict[str, str]


def _endpoint(accel: AccelProcess, token: str) -> NotificationEndpoint:
    return NotificationEndpoint(
        url=f"{accel.url}/events",
        headers={"Authorization": [f"Bearer {token}"]},
        timeout="3s",
        threshold=3,
        backoff="500ms",
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="lzs-accel-"))
    # No credentials anywhere: the registry is anonymous; never read the host's docker config.
    env = {**os.environ, "DOCKER_CONFIG": str(base / "docker-config")}
    accel: AccelProcess | None = None
    registry: Registry | None = None
    try:
        accel = start_accel(base / "accel", SERVICE_FLAGS, token=TOKEN, env=env)
        registry = start_registry(base / "registry", notifications=_endpoint(accel, TOKEN))
        yield Stack(base, accel, registry, env)
        assert accel.request("GET", "/healthz").status == 200
        assert "Traceback" not in accel.log(), accel.log()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        if registry is not None:
            registry.stop()
        if accel is not None:
            code = accel.stop()
            assert code == 0, f"accel exited {code} on SIGTERM:\n{accel.log()}"
        shutil.rmtree(base, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def build(stack: Stack, name: str, layers: int = 2) -> BuiltImage:
    """An image of `layers` random gzip layers (no earlier test can have indexed them)."""
    tars = [layer_tar([file(f"{name}/l{i}.bin", os.urandom(150_000))]) for i in range(layers)]
    return write_oci_layout(stack.base / "layouts" / name, "v1", tars)


def done_job(stack: Stack, digest: str, nth: int = 1) -> dict[str, Any] | None:
    """The nth finished (done or failed) job for digest, if there is one yet."""
    finished = [j for j in stack.accel.jobs(digest) if j["state"] in ("done", "failed")]
    return finished[nth - 1] if len(finished) >= nth else None


def index_show(stack: Stack, reference: str, *flags: str) -> dict[str, Any]:
    result = subprocess.run(
        [*SHOW, reference, "--plain-http", "--json", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=stack.env,
    )
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def layers_built(job: dict[str, Any]) -> int:
    """N of "N layer(s) indexed" in a done job's detail."""
    match = re.search(r"(\d+) layers? indexed", job["detail"])
    assert match is not None, job
    return int(match.group(1))


def wait_quiet(stack: Stack, repository: str, quiet: float = 3.0) -> list[dict[str, Any]]:
    """The jobs of repository once none is queued or running and none arrived for `quiet`
    seconds (the registry delivers the service's own pushes shortly after each build)."""
    deadline = time.monotonic() + 60
    seen: list[dict[str, Any]] = []
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        jobs = stack.accel.jobs(repository=repository)
        busy = any(j["state"] in ("queued", "running") for j in jobs)
        if busy or len(jobs) != len(seen):
            seen, stable_since = jobs, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            settled: list[dict[str, Any]] = jobs
            return settled
        time.sleep(0.2)
    raise AssertionError(f"jobs of {repository} never settled: {seen}")


def test_a_pushed_image_gets_indexed(stack: Stack) -> None:
    repo = f"{unique('ns')}/app"
    image = build(stack, unique("img"))
    pushed = push(image, stack.registry.host, repo, "v1")

    job = stack.accel.wait_for("the image's job", lambda: done_job(stack, image.manifest_digest))
    assert job["outcome"] == "indexed", job
    assert job["tag"] == "v1" and job["sender"] == "distribution"
    assert "2 layers indexed" in job["detail"]
    assert f"indexed {stack.registry.host}/{repo}:v1@{image.manifest_digest}" in stack.accel.log()

    [platform] = index_show(stack, pushed.reference)["platforms"]
    assert platform["manifest"] == image.manifest_digest
    assert platform["artifact"]["digest"] == job["artifacts"][0]
    assert [layer["indexed"] for layer in platform["layers"]] == [True, True]


def test_every_platform_of_a_pushed_index_gets_indexed(stack: Stack) -> None:
    repo = f"{unique('ns')}/multi"
    layout = stack.base / "layouts" / unique("multi")
    amd64 = write_oci_layout(layout, "amd64", [layer_tar([file("a.bin", os.urandom(150_000))])])
    arm64 = write_oci_layout(layout, "arm64", [layer_tar([file("b.bin", os.urandom(150_000))])])
    index_digest = write_platform_index(layout, "v1", {"linux/amd64": amd64, "linux/arm64": arm64})
    push_all(layout, "v1", f"{stack.registry.host}/{repo}:v1")

    job = stack.accel.wait_for("the index's job", lambda: done_job(stack, index_digest))
    # The platform manifests arrive first (jobs of one repository run one at a time), so by
    # the time the index's job runs both may already be indexed; either way, no platform
    # is left out and no layer is built twice.
    assert job["outcome"] in ("indexed", "already indexed"), job
    assert len(job["artifacts"]) == 2
    built = [layers_built(j) for j in wait_quiet(stack, repo) if j["outcome"] == "indexed"]
    assert sum(built) == 2, built  # each platform's one layer, once

    shown = index_show(stack, f"{stack.registry.host}/{repo}:v1", "--all-platforms")
    platforms = {p["platform"]: p for p in shown["platforms"]}
    assert sorted(platforms) == ["linux/amd64", "linux/arm64"]
    assert sorted(p["artifact"]["digest"] for p in platforms.values()) == sorted(job["artifacts"])
    assert all(layer["indexed"] for p in platforms.values() for layer in p["layers"])


def test_pushing_the_same_image_again_does_not_rebuild(stack: Stack) -> None:
    repo = f"{unique('ns')}/app"
    image = build(stack, unique("img"))
    push(image, stack.registry.host, repo, "v1")
    first = stack.accel.wait_for("first job", lambda: done_job(stack, image.manifest_digest))
    assert first["outcome"] == "indexed", first
    wait_quiet(stack, repo)

    offset = stack.registry.log_offset()
    push(image, stack.registry.host, repo, "v2")
    second = stack.accel.wait_for(
        "job of the re-push", lambda: done_job(stack, image.manifest_digest, nth=2)
    )
    assert second["outcome"] == "already indexed", second
    assert second["tag"] == "v2"
    assert second["artifacts"] == first["artifacts"]
    fetched = stack.registry.blob_fetches(since=offset)
    assert not {layer.digest for layer in image.layers} & set(fetched), fetched
    assert f"already indexed {stack.registry.host}/{repo}:v2@" in stack.accel.log()


def test_the_services_own_pushes_do_not_loop(stack: Stack) -> None:
    namespace = unique("ns")
    repo = f"{namespace}/app"
    image = build(stack, unique("img"))
    before = stack.accel.status()["counts"]
    push(image, stack.registry.host, repo, "v1")
    stack.accel.wait_for("the image's job", lambda: done_job(stack, image.manifest_digest))

    jobs = wait_quiet(stack, repo)
    # One build: the image. The artifact manifest it pushed comes back once (it has no tag,
    # so only its artifactType tells it apart) and is ignored, and so is the signature of that
    # artifact (the session signs builds: harness/trust.py); the sha256-<hex> tag indexes
    # and the layer cache repository's pushes are never even queued.
    assert (jobs[0]["digest"], jobs[0]["outcome"]) == (image.manifest_digest, "indexed")
    later = {(j["digest"], j["outcome"], j["detail"]) for j in jobs[1:]}
    signature_detail = (
        f"artifact (artifactType {COSIGN_SIGNATURE_ARTIFACT_TYPE}), not a container image"
    )
    assert (
        len(jobs) == 3 and (jobs[0]["artifacts"][0], "ignored", "lazysnap index artifact") in later
    )
    assert [j for j in later if j[1:] == ("ignored", signature_detail)], later
    assert stack.accel.jobs(repository=f"{namespace}/lazysnap-index-cache") == []
    after = stack.accel.status()["counts"]
    assert after["indexed"] - before["indexed"] == 1
    assert after["skipped_events"] > before["skipped_events"]  # blobs, tag index, cache


def test_a_wrong_token_is_refused_and_nothing_is_queued(stack: Stack) -> None:
    repo = f"{unique('ns')}/app"
    image = build(stack, unique("img"))
    body = distribution_envelope(stack.registry.host, repo, image.manifest_digest, "v1")
    received = stack.accel.status()["counts"]["received"]

    for token in ("wrong-token", ""):
        answer = stack.accel.request("POST", "/events", body, token=token)
        assert answer.status == 401, answer
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")

    # A registry configured with the wrong token: its deliveries are refused the same way.
    offset = len(stack.accel.log())
    wrong = start_registry(
        stack.base / unique("wrong-registry"),
        notifications=_endpoint(stack.accel, "not-the-token"),
    )
    try:
        push(image, wrong.host, repo, "v1")
        stack.accel.wait_for(
            "the refusal of the registry's delivery",
            lambda: "wrong bearer token" in stack.accel.log()[offset:],
        )
    finally:
        wrong.stop()
    assert stack.accel.jobs(repository=repo) == []
    assert stack.accel.status()["counts"]["received"] == received


def test_a_broken_layer_fails_with_its_reason_and_the_service_keeps_going(stack: Stack) -> None:
    repo = f"{unique('ns')}/broken"
    plain = write_oci_layout(
        stack.base / "layouts" / unique("plain"),
        "v1",
        [layer_tar([file("data.bin", os.urandom(100_000))])],
        compression="none",
    )
    broken = relabel_layers(plain, "application/vnd.oci.image.layer.v1.tar+gzip")
    push(broken, stack.registry.host, repo, "v1")

    job = stack.accel.wait_for(
        "the broken image's job", lambda: done_job(stack, broken.manifest_digest)
    )
    assert job["state"] == "failed", job
    assert job["attempts"] == 1  # a bad layer is not retried
    assert broken.layers[0].digest in job["reason"]
    assert "says gzip" in job["reason"]
    assert f"failed {stack.registry.host}/{repo}:v1@{broken.manifest_digest}" in stack.accel.log()

    assert stack.accel.request("GET", "/healthz").status == 200
    good = build(stack, unique("img"), layers=1)
    push(good, stack.registry.host, repo, "v2")
    after = stack.accel.wait_for(
        "the next image's job", lambda: done_job(stack, good.manifest_digest)
    )
    assert after["outcome"] == "indexed", after


def test_a_registry_outage_is_retried_until_it_is_back(stack: Stack) -> None:
    base = stack.base / unique("flaky")
    flaky = start_registry(base)  # no notifications: this test plays the registry's part
    try:
        repo = f"{unique('ns')}/app"
        image = build(stack, unique("img"), layers=1)
        push(image, flaky.host, repo, "v1")
        flaky.stop()

        body = distribution_envelope(flaky.host, repo, image.manifest_digest, "v1")
        assert stack.accel.request("POST", "/events", body).status == 202

        def retrying() -> dict[str, Any] | None:
            jobs = stack.accel.jobs(image.manifest_digest)
            return next((j for j in jobs if j["attempts"] >= 2 and j.get("last_error")), None)

        waiting = stack.accel.wait_for("a retried attempt", retrying)
        assert waiting["state"] in ("queued", "running")
        assert flaky.host in waiting["last_error"]

        flaky = start_registry(base, port=flaky.port)  # same storage, same port
        job = stack.accel.wait_for(
            "the job after the outage", lambda: done_job(stack, image.manifest_digest)
        )
        assert job["outcome"] == "indexed", job
        assert job["attempts"] >= 2
    finally:
        flaky.stop()


def test_an_image_in_another_namespace_reuses_shared_layers_indexed_for_the_first(
    stack: Stack,
) -> None:
    """The worker looks up layer indexes as `index build` does, the registry-wide cache
    included: the second namespace's image reads not one byte of the base layer."""
    base = layer_tar([file("base/shared.bin", os.urandom(150_000))])
    images = []
    for namespace in (unique("team"), unique("other")):
        own = layer_tar([file(f"{namespace}/own.bin", os.urandom(150_000))])
        image = write_oci_layout(stack.base / "layouts" / namespace, "v1", [base, own])
        images.append((f"{namespace}/app", image))
    (first_repo, first), (second_repo, second) = images
    push(first, stack.registry.host, first_repo, "v1")
    job = stack.accel.wait_for("the first job", lambda: done_job(stack, first.manifest_digest))
    assert job["outcome"] == "indexed" and layers_built(job) == 2, job
    wait_quiet(stack, first_repo)

    offset = stack.registry.log_offset()
    push(second, stack.registry.host, second_repo, "v1")
    job = stack.accel.wait_for("the second job", lambda: done_job(stack, second.manifest_digest))
    assert job["outcome"] == "indexed", job
    assert "1 layer indexed, 1 reused" in job["detail"], job
    fetched = stack.registry.blob_fetches(since=offset)
    shared = second.layers[0].digest
    assert shared not in fetched or fetched[shared].bytes == 0, fetched[shared]
    assert f"{second.layers[1].size} bytes read" in job["detail"], job
