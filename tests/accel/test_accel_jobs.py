"""The acceleration service's job queue: dedupe, one job per repository at a time, retries
with backoff, and the status document."""

from __future__ import annotations

import threading
import time

import pytest

from snapshotter.accel.events import PushedImage
from snapshotter.accel.jobs import JobQueue, JobState, Outcome, QueueClosed, QueueFull


def image(repository: str = "team/app", n: int = 1, registry: str = "reg:5000") -> PushedImage:
    return PushedImage(registry, repository, "sha256:" + f"{n:02x}" * 32, "v1")


def test_the_same_image_twice_is_queued_once() -> None:
    queue = JobQueue()
    assert queue.submit(image()) is not None
    assert queue.submit(image()) is None
    job = queue.take(timeout=1)
    assert job is not None
    assert queue.submit(image()) is None  # running counts too
    queue.finish(job, Outcome.INDEXED, "1 layer", ("sha256:" + "aa" * 32,))
    assert queue.submit(image()) is not None  # pushed again later: checked again
    counts = queue.status()["counts"]
    assert counts["received"] == 4 and counts["deduplicated"] == 2 and counts["indexed"] == 1


def test_one_job_per_repository_at_a_time_in_arrival_order() -> None:
    queue = JobQueue()
    first = queue.submit(image("team/a", 1))
    second = queue.submit(image("team/a", 2))
    other = queue.submit(image("team/b", 3))
    assert queue.take(timeout=1) is first
    assert queue.take(timeout=1) is other  # team/a is busy: team/b goes ahead
    assert queue.take(timeout=0.2) is None
    assert first is not None
    queue.finish(first, Outcome.INDEXED, "", ())
    assert queue.take(timeout=1) is second


def test_the_same_repository_on_another_registry_is_not_blocked() -> None:
    queue = JobQueue()
    queue.submit(image(registry="one:5000"))
    queue.submit(image(registry="two:5000"))
    assert queue.take(timeout=1) is not None
    assert queue.take(timeout=1) is not None


def test_transient_failures_retry_with_growing_backoff_then_fail_with_the_reason() -> None:
    queue = JobQueue(max_attempts=3, backoff_seconds=0.1)
    queue.submit(image())
    delays = []
    for _ in range(2):
        job = queue.take(timeout=5)
        assert job is not None
        delay = queue.fail(job, "registry reg:5000 unavailable", transient=True)
        assert delay is not None
        delays.append(delay)
        [queued] = queue.status()["queued"]
        assert queued["last_error"] == "registry reg:5000 unavailable"
    assert delays == [0.1, 0.2]
    started = time.monotonic()
    job = queue.take(timeout=5)
    assert job is not None and time.monotonic() - started >= 0.15  # waited out the backoff
    assert queue.fail(job, "registry reg:5000 unavailable", transient=True) is None
    [failed] = queue.status()["failed"]
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert failed["reason"] == "after 3 attempts: registry reg:5000 unavailable"


def test_a_permanent_failure_is_not_retried() -> None:
    queue = JobQueue(max_attempts=5)
    queue.submit(image())
    job = queue.take(timeout=1)
    assert job is not None
    assert queue.fail(job, "layer sha256:.. is not gzip", transient=False) is None
    status = queue.status()
    assert status["queued"] == [] and status["failed"][0]["reason"] == "layer sha256:.. is not gzip"
    assert status["counts"]["retries"] == 0


def test_a_waiting_retry_keeps_later_pushes_of_its_repository_behind_it() -> None:
    queue = JobQueue(backoff_seconds=0.3)
    queue.submit(image(n=1))
    queue.submit(image(n=2))
    job = queue.take(timeout=1)
    assert job is not None
    queue.fail(job, "503", transient=True)
    retried = queue.take(timeout=2)
    assert retried is job  # not image 2, although image 2 was runnable meanwhile


def test_close_wakes_waiting_workers_and_refuses_new_work() -> None:
    queue = JobQueue()
    taken: list[object] = []
    worker = threading.Thread(target=lambda: taken.append(queue.take()))
    worker.start()
    time.sleep(0.1)
    queue.submit(image())
    worker.join(timeout=2)
    assert taken and taken[0] is not None
    waiting = threading.Thread(target=lambda: taken.append(queue.take()))
    waiting.start()
    queue.submit(image(n=2))  # the waiting worker may take it; either way close returns
    queue.close()
    waiting.join(timeout=2)
    assert not waiting.is_alive()
    with pytest.raises(QueueClosed):
        queue.submit(image(n=3))


def test_status_document_lists_every_state() -> None:
    queue = JobQueue()
    for n in range(3):
        queue.submit(image(f"team/r{n}", n))
    done = queue.take(timeout=1)
    running = queue.take(timeout=1)
    assert done is not None and running is not None
    queue.finish(done, Outcome.ALREADY_INDEXED, "artifact sha256:..", ())
    status = queue.status()
    assert [j["repository"] for j in status["done"]] == ["team/r0"]
    assert status["done"][0]["outcome"] == "already indexed"
    assert [j["state"] for j in status["running"]] == [str(JobState.RUNNING)]
    assert [j["repository"] for j in status["queued"]] == ["team/r2"]
    assert status["counts"]["already_indexed"] == 1 and status["counts"]["queued"] == 1


def test_a_full_queue_refuses_new_images_but_still_dedupes() -> None:
    queue = JobQueue(max_queued=2)
    queue.submit(image(n=1))
    queue.submit(image(n=2))
    with pytest.raises(QueueFull, match="limit 2"):
        queue.submit(image(n=3))
    assert queue.submit(image(n=1)) is None  # a re-sent delivery's queued images: no error
    assert queue.take(timeout=1) is not None
    assert queue.submit(image(n=3)) is not None
