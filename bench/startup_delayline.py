"""A packet delay line between two TUN devices: `python startup_delayline.py TUN_A TUN_B MS`.

This kernel has no sch_netem (nor fq/etf, which honour departure times), so the shaped link's
latency cannot come from a qdisc. This process owns two TUN devices and copies every IP packet
read from one into the other after MS milliseconds; the kernel's TCP on both sides sees a real
round trip (slow start, ACK clocking), and the rate limit stays in the kernel (tbf on each TUN).
The devices exist only while this process holds them open, so killing it removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import selectors
import signal
import struct
import sys
import time
from types import FrameType

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # raw IP packets, no 4-byte packet-info header
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    """Create TUN device `name` (non-persistent: gone when the fd closes) and return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def relay(fd_a: int, fd_b: int, delay_s: float) -> None:
    """Forward packets a->b and b->a, each after delay_s, until a signal ends the process."""
    peer = {fd_a: fd_b, fd_b: fd_a}
    selector = selectors.DefaultSelector()
    for fd in peer:
        selector.register(fd, selectors.EVENT_READ)
    due: list[tuple[float, int, int, bytes]] = []  # (send at, sequence, destination fd, packet)
    sequence = 0
    while True:
        timeout = None if not due else max(0.0, due[0][0] - time.monotonic())
        for key, _events in selector.select(timeout):
            source = int(key.fd)
            while True:
                try:
                    packet = os.read(source, MAX_PACKET)
                except BlockingIOError:
                    break
                heapq.heappush(due, (time.monotonic() + delay_s, sequence, peer[source], packet))
                sequence += 1
        now = time.monotonic()
        while due and due[0][0] <= now:
            _when, _seq, destination, packet = heapq.heappop(due)
            # A device whose queue is full drops the packet, as a real link would.
            with contextlib.suppress(OSError):
                os.write(destination, packet)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: startup_delayline.py TUN_A TUN_B DELAY_MS", file=sys.stderr)
        return 2
    name_a, name_b, delay_ms = argv
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        fd_a, fd_b = open_tun(name_a), open_tun(name_b)
    except OSError as exc:
        print(f"delay line: cannot create TUN devices {name_a}/{name_b}: {exc}", file=sys.stderr)
        return 1
    print(f"delay line {name_a} <-> {name_b}: {delay_ms} ms each way", flush=True)
    relay(fd_a, fd_b, float(delay_ms) / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
