"""Index bombs pushed as an image's lazysnap index, through the real stack (issue 12): the layer
falls back to a full pull (the container sees the real files), the daemon stays up and serves
on, and its peak resident memory stays bounded while it discovers and refuses the index.

Before the decoder's caps, the 15 KB bomb took the daemon from 78 MB to 4.2 GB resident and the
million-entry index cost it 1.2 GB. The peak is the daemon's VmHWM, reset right before the pull
(`echo 5 > /proc/PID/clear_refs`), so earlier tests of the session do not count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.crafted import document_blob, empty_lists_bomb, many_entries
from tests.lazy.lazy_helpers import LazyStack, unique_name
from tests.lazy.test_lazy_fallback import (
    _push_index_artifact,
    assert_full_pull_runs,
    data_image,
    registry_client,
)

pytestmark = pytest.mark.stack

# Generous: the daemon idles at ~80 MB; a regression to the old decoder costs gigabytes.
MAX_DAEMON_PEAK_MB = 300

BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "zstd-bomb-160MiB": (lambda: empty_lists_bomb(160 << 20), "more than 64x the blob"),
    "million-entries": (lambda: document_blob(many_entries(1_000_000)), "exceeds the 67108864"),
}


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_an_index_bomb_falls_back_with_the_daemon_up_and_its_memory_bounded(
    stack: LazyStack, bomb: str
) -> None:
    make, reason = BOMBS[bomb]
    image = data_image(stack, f"bomb-{bomb}")
    target = stack.push(image.built, unique_name("test/lazy-bomb"))
    blob = make()
    with registry_client(stack) as client:
        _push_index_artifact(client, target, image.data_layer, blob)
    pid = stack.daemon.pid
    assert pid is not None
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_mb = _status_kb(pid, "VmHWM") // 1024

    offset = stack.daemon_log_offset()
    line = assert_full_pull_runs(stack, image, target.reference, offset)

    peak_mb = _status_kb(pid, "VmHWM") // 1024
    print(
        f"\n{bomb}: {len(blob)} byte index blob; daemon VmHWM {before_mb} MB before the pull, "
        f"{peak_mb} MB after; {line}"
    )
    assert reason in line, line
    assert stack.daemon.pid == pid and Path(f"/proc/{pid}").exists()  # the same daemon, up
    assert peak_mb < MAX_DAEMON_PEAK_MB, f"daemon peaked at {peak_mb} MB decoding {bomb}"
    # and it still serves: an image without an index pulls and runs after the bomb
    other = data_image(stack, f"after-{bomb}")
    pushed = stack.push(other.built, unique_name("test/lazy-after-bomb"))
    assert_full_pull_runs(stack, other, pushed.reference, stack.daemon_log_offset())
