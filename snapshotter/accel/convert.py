"""`lazysnap accel convert IMAGE...`: the one-time mode, acceld's `accelctl convert`.

Each image goes through exactly what a service task does (worker.index_pushed_image: the
not-an-image checks, every platform, signing, the transient/permanent sorting of failures,
retries with backoff) without a service or a store, and is reported as a task row: the
same JSON objects GET /api/v1/conversions and `accel tasks --json` print.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from snapshotter.accel.events import PushedImage
from snapshotter.accel.record import Job, JobState, failure_detail, retry_delay
from snapshotter.accel.tasks_cli import format_table
from snapshotter.accel.worker import JobFailed, RegistryClients, WorkerOptions, index_pushed_image
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.reference import Reference

SENDER = "convert"


def convert_one(
    clients: RegistryClients,
    number: int,
    text: str,
    options: WorkerOptions,
    *,
    max_attempts: int,
    backoff_seconds: float,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Job:
    """Index one image reference (tag or digest) as a task numbered `number`."""
    job = Job(id=number, image=PushedImage("", text, ""), received_at=clock())
    try:
        ref = Reference.parse(text)
        client = clients.for_registry(ref.registry)
        digest = ref.digest or client.get_manifest(ref).digest
    except (ValueError, RegistryError) as exc:
        return _failed(job, f"{text}: {exc}", clock)
    job.image = PushedImage(
        ref.registry, ref.name, digest, ref.tag if ref.tag_given else None, sender=SENDER
    )
    while True:
        job.attempts += 1
        job.started_at = clock()
        try:
            result = index_pushed_image(clients, job.image, options)
        except JobFailed as exc:
            job.last_error = exc.reason
            if exc.transient and job.attempts < max_attempts:
                sleep(retry_delay(job.attempts, backoff_seconds))
                continue
            return _failed(job, failure_detail(exc.reason, job.attempts), clock)
        job.state, job.outcome, job.detail = JobState.DONE, result.outcome, result.detail
        job.artifacts, job.finished_at = result.artifacts, clock()
        return job


def _failed(job: Job, reason: str, clock: Callable[[], float]) -> Job:
    job.state, job.detail, job.finished_at = JobState.FAILED, reason, clock()
    return job


def run(args: argparse.Namespace) -> int:
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.trust.keys import TrustKeyError, load_signing_key

    try:
        sign_key = load_signing_key(args.sign_key) if args.sign_key else None
        access = RegistryAccess.create(hosts_dir=args.hosts_dir)
        credentials = access.credentials()
    except (TrustKeyError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = WorkerOptions(
        span_size=args.span_size,
        min_layer_size=args.min_layer_size,
        layer_jobs=args.layer_jobs,
        cache_repos=tuple(args.cache_repo),
        shared_cache=args.shared_cache,
        sign_key=sign_key,
        static_profile=args.static_profile,
    )
    clients = RegistryClients(access, credentials, plain_http=args.plain_http)
    try:
        jobs = [
            convert_one(
                clients,
                number,
                text,
                options,
                max_attempts=args.max_attempts,
                backoff_seconds=args.retry_backoff,
            )
            for number, text in enumerate(args.images, 1)
        ]
    finally:
        clients.close()
    tasks = [job.to_task() for job in jobs]
    if args.json:
        json.dump(tasks, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(tasks))
    return 0 if all(job.state is JobState.DONE for job in jobs) else 1
