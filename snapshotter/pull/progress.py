"""What `lazysnap pull` prints: one line per layer, a tqdm bar while a blob downloads (only on a
terminal, so logs and tests get clean lines), and a summary."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

from snapshotter.pull.outcome import LayerOutcome, PullSummary
from snapshotter.pull.plan import LayerStep

MB = 1_000_000


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


class TerminalProgress:
    def __init__(self, out: TextIO | None = None, bars: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.bars = self.out.isatty() if bars is None else bars
        self._total = 0

    def layer_started(self, step: LayerStep, total_layers: int) -> None:
        self._total = total_layers

    def blob_chunks(self, step: LayerStep, chunks: Iterator[bytes]) -> Iterator[bytes]:
        if not self.bars:
            yield from chunks
            return
        with download_bar(
            self.out, step.position, self._total, step.blob.digest, step.blob.size
        ) as bar:
            for chunk in chunks:
                bar.update(len(chunk))
                yield chunk

    def layer_done(
        self, step: LayerStep, outcome: LayerOutcome, downloaded: int, why_not_lazy: str = ""
    ) -> None:
        line = layer_line(
            step.position,
            self._total,
            step.blob.digest,
            step.blob.size,
            outcome,
            downloaded,
            why_not_lazy,
        )
        print(line, file=self.out, flush=True)

    def summary(self, summary: PullSummary) -> None:
        print(summary_line(summary), file=self.out, flush=True)


def _layer_head(position: int, total: int, digest: str) -> str:
    return f"layer {position + 1}/{total} {_short(digest)}"


def download_bar(out: TextIO, position: int, total: int, digest: str, size: int) -> Any:
    """A tqdm bar for one layer's download; also what `lazysnap pull` shows for a pull the
    daemon runs (snapshotter/pull/wire.py)."""
    from tqdm import tqdm  # only on a terminal: its import costs ~20 ms of every pull

    desc = _layer_head(position, total, digest)
    return tqdm(total=size, unit="B", unit_scale=True, desc=desc, file=out, leave=False)


def layer_line(
    position: int,
    total: int,
    digest: str,
    size: int,
    outcome: LayerOutcome,
    downloaded: int,
    why_not_lazy: str = "",
) -> str:
    head = _layer_head(position, total, digest)
    if outcome is LayerOutcome.LAZY:
        detail = f"lazy ({_mb(size)} not downloaded)"
    elif outcome is LayerOutcome.PRESENT:
        detail = "already present"
    elif downloaded:
        detail = f"pulled {_mb(downloaded)}"
    else:
        detail = "unpacked (blob was in the content store)"
    if why_not_lazy and outcome is LayerOutcome.PULLED:
        detail += f" (not lazy: {why_not_lazy})"
    return f"{head}: {detail}"


def summary_line(summary: PullSummary) -> str:
    parts = [
        f"{summary.count(LayerOutcome.LAZY)} lazy",
        f"{summary.count(LayerOutcome.PULLED)} pulled",
    ]
    present = summary.count(LayerOutcome.PRESENT)
    if present:
        parts.append(f"{present} already present")
    return (
        f"{summary.image}: {_layers(len(summary.outcomes))} ({', '.join(parts)}), "
        f"{_mb(summary.bytes_downloaded)} downloaded in {summary.seconds:.1f} s"
    )
