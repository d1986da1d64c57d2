"""What a pull did, layer by layer: kept apart from the puller (which loads grpc), so the CLI can
print what `lazysnap serve` reports without loading it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class LayerOutcome(StrEnum):
    LAZY = "lazy"  # the snapshotter mounted it remotely: no blob fetched
    PULLED = "pulled"  # blob fetched (or found in the content store) and unpacked
    PRESENT = "present"  # the chain ID snapshot existed before this pull


@dataclass
class PullSummary:
    image: str
    manifest_digest: str = ""
    outcomes: list[LayerOutcome] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def count(self, outcome: LayerOutcome) -> int:
        return sum(1 for o in self.outcomes if o is outcome)
