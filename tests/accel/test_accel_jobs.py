"""The acceleration service's job queue over both job stores (SQLite and a real PostgreSQL):
durability, dedupe, one job per repository at a time, retries with backoff, leases that
expire when a worker dies, and the status document."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from accel_helpers import postgres_or_skip

from harness.postgres import Postgres
from snapshotter.accel.events import PushedImage
from snapshotter.accel.jobs import JobQueue, QueueClosed, QueueFull
from snapshotter.accel.open_store import open_store
from snapshotter.accel.reconcile import RateLimit
from snapshotter.accel.record import JobState, Outcome
from snapshotter.accel.store import JobStore, SqliteJobStore, StoreBusy, StoreError

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def image(repository: str = "team/app", n: int = 1, registry: str = "reg:5000") -> PushedImage:
    return PushedImage(registry, repository, "sha256:" + f"{n:02x}" * 32, "v1")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="lzs-accel-pg-"))
    server = postgres_or_skip(base)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)  # its log: every run would leave one in /tmp


@pytest.fixture(params=["sqlite", "postgresql"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store lives: an SQLite file, or a new database of the test server."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "jobs.sqlite")
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database(f"jobs_{secrets.token_hex(4)}")


@pytest.fixture
def store(store_spec: str) -> Iterator[JobStore]:
    opened = open_store(store_spec)
    yield opened
    opened.close()


def new_queue(store: JobStore, clock: Clock, owner: str = "worker-a", **kw: float) -> JobQueue:
    return JobQueue(store, owner=owner, clock=clock, poll_seconds=0.05, **kw)  # type: ignore[arg-type]


def test_the_same_image_twice_is_queued_once(store: JobStore) -> None:
    queue = new_queue(store, Clock())
    first, created = queue.submit(image())
    assert created
    again, created = queue.submit(image())
    assert not created and again.id == first.id
    job = queue.take(timeout=1)
    assert job is not None and job.id == first.id
    assert queue.submit(image())[1] is False  # running counts too
    queue.finish(job, Outcome.INDEXED, "1 layer", ("sha256:" + "aa" * 32,))
    assert queue.submit(image())[1] is True  # pushed again later: checked again
    counts = queue.status()["counts"]
    assert counts["received"] == 4 and counts["deduplicated"] == 2 and counts["indexed"] == 1


def test_one_job_per_repository_at_a_time_in_arrival_order(store: JobStore) -> None:
    queue = new_queue(store, Clock())
    first, _ = queue.submit(image("team/a", 1))
    second, _ = queue.submit(image("team/a", 2))
    other, _ = queue.submit(image("team/b", 3))
    taken = queue.take(timeout=1)
    assert taken is not None and taken.id == first.id
    after = queue.take(timeout=1)
    assert after is not None and after.id == other.id  # team/a is busy: team/b goes ahead
    assert queue.take(timeout=0.2) is None
    queue.finish(taken, Outcome.INDEXED, "", ())
    last = queue.take(timeout=1)
    assert last is not None and last.id == second.id


def test_the_same_repository_on_another_registry_is_not_blocked(store: JobStore) -> None:
    queue = new_queue(store, Clock())
    queue.submit(image(registry="one:5000"))
    queue.submit(image(registry="two:5000"))
    assert queue.take(timeout=1) is not None
    assert queue.take(timeout=1) is not None


def test_transient_failures_retry_with_growing_backoff_then_fail(store: JobStore) -> None:
    clock = Clock()
    queue = new_queue(store, clock, max_attempts=3, backoff_seconds=10)
    queue.submit(image())
    delays = []
    for _ in range(2):
        job = queue.take(timeout=1)
        assert job is not None
        delay = queue.fail(job, "registry reg:5000 unavailable", transient=True)
        assert delay is not None
        delays.append(delay)
        [queued] = queue.status()["queued"]
        assert queued["last_error"] == "registry reg:5000 unavailable"
        assert queued["retry_in_seconds"] == delay
        assert queue.take(timeout=0.1) is None  # not before its time
        clock.now += delay
    assert delays == [10, 20]
    job = queue.take(timeout=1)
    assert job is not None
    assert queue.fail(job, "registry reg:5000 unavailable", transient=True) is None
    [failed] = queue.status()["failed"]
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert failed["reason"] == "after 3 attempts: registry reg:5000 unavailable"


def test_a_permanent_failure_is_not_retried(store: JobStore) -> None:
    queue = new_queue(store, Clock(), max_attempts=5)
    queue.submit(image())
    job = queue.take(timeout=1)
    assert job is not None
    assert queue.fail(job, "layer sha256:.. is not gzip", transient=False) is None
    status = queue.status()
    assert status["queued"] == [] and status["failed"][0]["reason"] == "layer sha256:.. is not gzip"
    assert status["counts"]["retries"] == 0
    [task] = queue.tasks([JobState.FAILED])
    assert task.to_task()["status"] == "failed"


def test_a_waiting_retry_keeps_later_pushes_of_its_repository_behind_it(store: JobStore) -> None:
    clock = Clock()
    queue = new_queue(store, clock, backoff_seconds=5)
    first, _ = queue.submit(image(n=1))
    queue.submit(image(n=2))
    job = queue.take(timeout=1)
    assert job is not None
    queue.fail(job, "503", transient=True)
    assert queue.take(timeout=0.1) is None  # image 2 is runnable, but waits behind the retry
    clock.now += 5
    retried = queue.take(timeout=1)
    assert retried is not None and retried.id == first.id


def test_close_wakes_waiting_workers_and_keeps_the_queued_jobs(store_spec: str) -> None:
    store = open_store(store_spec)
    queue = new_queue(store, Clock())
    taken: list[object] = []
    waiting = threading.Thread(target=lambda: taken.append(queue.take()))
    waiting.start()
    assert queue.close() == 0
    waiting.join(timeout=2)
    assert not waiting.is_alive() and taken == [None]
    with pytest.raises(QueueClosed):
        queue.submit(image(n=3))
    store.close()


def test_jobs_survive_a_crash_and_interrupted_ones_run_again(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite")
    store = SqliteJobStore(path)
    queue = new_queue(store, Clock())
    for n in range(4):
        queue.submit(image(f"team/r{n}", n))
    running = queue.take(timeout=1)
    assert running is not None
    with pytest.raises(StoreBusy, match="another `lazysnap accel serve` uses it"):
        SqliteJobStore(path)
    store.close()  # the process dies: nothing finished, nothing released

    reopened = SqliteJobStore(path)
    assert reopened.recovered == 1
    queue = new_queue(reopened, Clock(), owner="worker-b")
    ids = []
    while (job := queue.take(timeout=0.2)) is not None:
        ids.append(job.id)
        queue.finish(job, Outcome.INDEXED, "", ())
    assert sorted(ids) == [1, 2, 3, 4]
    again = next(j for j in reopened.jobs() if j.id == running.id)
    assert again.attempts == 2 and again.state is JobState.DONE
    reopened.close()


def test_a_dead_workers_lease_expires_and_another_takes_the_job(store: JobStore) -> None:
    clock = Clock()
    dead = new_queue(store, clock, owner="replica-1", lease_seconds=30)
    alive = new_queue(store, clock, owner="replica-2", lease_seconds=30)
    dead.submit(image())
    lost = dead.take(timeout=1)
    assert lost is not None
    assert alive.take(timeout=0.1) is None  # leased: not runnable elsewhere
    clock.now += 20
    assert dead.renew() == []  # a live worker keeps its lease
    clock.now += 20
    assert alive.take(timeout=0.1) is None
    clock.now += 31  # replica-1 stopped renewing
    job = alive.take(timeout=1)
    assert job is not None and job.id == lost.id and job.attempts == 2
    assert job.last_error == "worker replica-1 stopped (lease expired)"
    assert [j.id for j in dead.renew()] == [lost.id]  # the old worker learns it lost it
    alive.finish(job, Outcome.INDEXED, "", ())
    dead.finish(lost, Outcome.INDEXED, "late", ())  # counts for nothing
    [done] = store.jobs([JobState.DONE])
    assert done.detail == "" and done.attempts == 2


def test_status_document_lists_every_state(store: JobStore) -> None:
    queue = new_queue(store, Clock())
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
    assert status["running"][0]["worker"] == "worker-a"
    assert [j["repository"] for j in status["queued"]] == ["team/r2"]
    assert status["counts"]["already_indexed"] == 1 and status["counts"]["queued"] == 1
    tasks = [job.to_task() for job in queue.tasks()]
    assert [t["status"] for t in tasks] == ["queued", "running", "succeeded"]
    assert tasks[2]["finished"] is not None and tasks[0]["finished"] is None


def test_a_full_queue_refuses_new_images_but_still_dedupes(store: JobStore) -> None:
    queue = new_queue(store, Clock())
    queue.max_queued = 2
    queue.submit(image(n=1))
    queue.submit(image(n=2))
    with pytest.raises(QueueFull, match="limit 2"):
        queue.submit(image(n=3))
    assert queue.submit(image(n=1))[1] is False  # a re-sent delivery's queued images: no error
    assert queue.take(timeout=1) is not None
    assert queue.submit(image(n=3))[1] is True


def test_finished_history_is_pruned_to_its_limit(store: JobStore) -> None:
    queue = new_queue(store, Clock())
    queue.keep_finished = 10
    for n in range(105):
        queue.submit(image(f"team/r{n}", n))
        job = queue.take(timeout=1)
        assert job is not None
        queue.finish(job, Outcome.INDEXED, "", ())
    assert len(store.jobs()) == 15  # pruned to 10 at the 100th, 5 more since


def test_two_queues_claim_disjoint_jobs_concurrently(postgres: Postgres) -> None:
    """Replicas racing for the same PostgreSQL rows (an SQLite store has one service):
    every job is claimed by exactly one of them."""
    store_spec = postgres.create_database(f"race_{secrets.token_hex(4)}")
    stores = [open_store(store_spec) for _ in range(4)]
    clock = Clock()
    queues = [new_queue(s, clock, owner=f"replica-{i}") for i, s in enumerate(stores)]
    for n in range(60):
        queues[0].submit(image(f"team/r{n % 20}", n))
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(queue: JobQueue) -> None:
        while (job := queue.take(timeout=0.5)) is not None:
            with lock:
                claimed.append((queue.owner, job.id))
            queue.finish(job, Outcome.INDEXED, "", ())

    threads = [threading.Thread(target=work, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(job_id for _, job_id in claimed) == list(range(1, 61))
    assert len({owner for owner, _ in claimed}) > 1
    for s in stores:
        s.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite")
    SqliteJobStore(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE lazysnap_accel_schema SET version = 99")
    with pytest.raises(Exception, match="schema version 99 was written by a newer lazysnap"):
        SqliteJobStore(path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_reconcile_requests_are_spaced_to_the_rate() -> None:
    clock = Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> bool:
        slept.append(seconds)
        clock.now += seconds
        return False

    limit = RateLimit(4.0, clock, sleep)
    for _ in range(5):
        assert limit.wait() is False
    assert slept == [0.25, 0.25, 0.25, 0.25]  # the first goes at once
    clock.now += 10  # idle time is not saved up for a burst
    limit.wait()
    limit.wait()
    assert slept[-1] == 0.25 and len(slept) == 5
    assert RateLimit(1.0, clock, lambda _: True).wait() is False  # nothing to wait for yet
    stopping = RateLimit(1.0, clock, lambda _: True)
    stopping.wait()
    assert stopping.wait() is True  # a stop during the wait is reported


def test_a_postgresql_restart_is_ridden_out(tmp_path: Path) -> None:
    """The database goes away and comes back: calls meanwhile fail with StoreError (webhooks
    get 503, workers retry), then the same store object reconnects and nothing was lost."""
    server = postgres_or_skip(tmp_path / "pg")
    try:
        store = open_store(server.create_database("restart"))
        queue = new_queue(store, Clock())
        queue.submit(image(n=1))
        server.stop_server()
        with pytest.raises(StoreError, match="job store postgresql://"):
            queue.submit(image(n=2))
        with pytest.raises(StoreError):
            queue.take(timeout=0.1)
        server.start()
        assert queue.submit(image(n=2))[1] is True
        assert [job.image.digest for job in store.jobs()] == [image(n=2).digest, image(n=1).digest]
        store.close()
    finally:
        server.stop()
