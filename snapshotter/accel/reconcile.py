"""Reconcile: a periodic pass over named repositories that queues the tagged images that
have no index yet, so a webhook the service missed (it was down, the registry gave up
re-sending) heals itself.

One pass: list each repository's tags (tags API), resolve each tag to its manifest digest,
and queue the image unless the repository already holds the referrers tag-schema index of
that digest (`sha256-<hex>`: lazysnap's artifact of a single-platform image, the cheap
answer for registries without the referrers API). Everything else is queued: the store
dedupes jobs already queued or running, and a worker finds an indexed image (or an index
over indexed platforms) a quick no-op. lazysnap's own tags are never queued.

Registry requests are spaced to at most `per_second`, so a pass over a large repository
does not compete with the pushes it watches. Time is passed in (clock, and a wait that a
stop interrupts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snapshotter.accel.events import PushedImage, own_push
from snapshotter.accel.record import Job
from snapshotter.accel.worker import RegistryClients
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.tags import list_tags

log = logging.getLogger("lazysnap.accel")

SENDER = "reconcile"


@dataclass(frozen=True)
class ReconcileOptions:
    repositories: tuple[Repository, ...]
    interval_seconds: float = 3600.0
    per_second: float = 2.0  # registry requests per second, at most
    cache_repos: tuple[str, ...] = ()  # --cache-repo: never queue these repositories' tags


@dataclass
class PassReport:
    tags: int = 0
    queued: int = 0
    already_indexed: int = 0  # the referrers tag-schema index of the digest exists
    live: int = 0  # already queued or running
    skipped: int = 0  # lazysnap's own tags
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.tags} tags: {self.queued} queued, {self.already_indexed} already indexed, "
            f"{self.live} already queued, {self.skipped} lazysnap's own, "
            f"{len(self.errors)} errors"
        )


class RateLimit:
    """At most per_second calls of wait() return per second (evenly spaced)."""

    def __init__(
        self, per_second: float, clock: Callable[[], float], sleep: Callable[[float], bool]
    ) -> None:
        self._gap = 1.0 / per_second
        self._clock = clock
        self._sleep = sleep  # returns True when the service is stopping
        self._next = clock()

    def wait(self) -> bool:
        """Wait for the next slot; True if a stop came meanwhile."""
        now = self._clock()
        if self._next > now and self._sleep(self._next - now):
            return True
        self._next = max(self._next, now) + self._gap
        return False


class Reconciler:
    def __init__(
        self,
        clients: RegistryClients,
        submit: Callable[[PushedImage], tuple[Job, bool]],
        options: ReconcileOptions,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], bool],
    ) -> None:
        self.clients = clients
        self.submit = submit
        self.options = options
        self._sleep = sleep
        self._limit = RateLimit(options.per_second, clock, sleep)

    def run(self) -> None:
        """Passes every interval until sleep() says the service stops."""
        while True:
            try:
                report = self.run_pass()
            except Exception:  # the store is away, the queue is full: try at the next pass
                log.exception("reconcile pass failed")
            else:
                log.info("reconcile pass: %s", report.summary())
                for error in report.errors:
                    log.warning("reconcile: %s", error)
            if self._sleep(self.options.interval_seconds):
                return

    def run_pass(self, repositories: Sequence[Repository] | None = None) -> PassReport:
        report = PassReport()
        for repository in repositories or self.options.repositories:
            if self._repository(repository, report):
                break  # stopping
        return report

    def _repository(self, repository: Repository, report: PassReport) -> bool:
        client = self.clients.for_registry(repository.registry)
        if self._limit.wait():
            return True
        try:
            tags = list_tags(client, repository)
        except RegistryError as exc:
            report.errors.append(f"tags of {repository}: {exc}")
            return False
        present = set(tags)
        for tag in sorted(tags):
            report.tags += 1
            if own_push(repository.name, tag, self.options.cache_repos) is not None:
                report.skipped += 1
                continue
            if self._limit.wait():
                return True
            try:
                manifest = client.get_manifest(Reference.parse(f"{repository}:{tag}"))
            except RegistryError as exc:
                report.errors.append(f"{repository}:{tag}: {exc}")
                continue
            if "sha256-" + manifest.digest.removeprefix("sha256:") in present:
                report.already_indexed += 1
                continue
            image = PushedImage(
                repository.registry,
                repository.name,
                manifest.digest,
                tag,
                manifest.media_type,
                sender=SENDER,
            )
            job, created = self.submit(image)
            if created:
                report.queued += 1
                log.info("job %d: reconcile queued %s", job.id, image)
            else:
                report.live += 1
        return False
