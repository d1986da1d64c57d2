"""The two links the startup benchmark measures: the registry on loopback (harness), and
the registry alone in a network namespace behind a shaped link (100 Mbit/s, 20 ms RTT).

The shaped link: two TUN devices joined by startup_delayline.py (10 ms each way; this kernel
has no sch_netem), one in the host namespace and one moved into the registry's namespace, each
rate-limited by tbf. containerd, lazysnap and the benchmark reach the registry at its address
on that link. Everything is torn down on exit, error or Ctrl-C: registry, delay line (its TUN
devices vanish with it), namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import HarnessError, Service, run, spawn
from harness.registry import REGISTRY_BINARY, Registry, start_registry

DELAY_LINE = Path(__file__).resolve().parent / "startup_delayline.py"
# Only the registry listens in its private namespace, so a fixed port cannot collide there.
SHAPED_REGISTRY_PORT = 5000
# Jumbo frames keep the delay line at ~1.4k packets/s at 100 Mbit/s (Python copies each one).
SHAPED_MTU = 9000


@dataclass(frozen=True)
class Shape:
    rate_mbit: int = 100
    one_way_delay_ms: float = 10.0

    def describe(self) -> str:
        return f"{self.rate_mbit} Mbit/s, {2 * self.one_way_delay_ms:g} ms RTT"


@dataclass
class ShapedRegistry(Registry):
    """A harness Registry listening on the namespace side of the shaped link."""

    address: str = ""

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass
class Link:
    name: str  # "loopback" or "shaped"
    description: str
    registry: Registry
    measured: dict[str, float] = field(default_factory=dict)


def registry_config(data_dir: Path, listen: str) -> dict[str, object]:
    """docker-registry config: filesystem storage in data_dir, access log on (the harness's
    fetch accounting reads it), listening on listen (host:port)."""
    return {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(data_dir)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "redirect": {"disable": True},
        },
        "http": {"addr": listen, "headers": {"X-Content-Type-Options": ["nosniff"]}},
        "health": {"storagedriver": {"enabled": False}},
    }


def _answers_v2(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = run(["ip", "-4", "-o", "addr", "show"], "list addresses").stdout
    networks = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            networks.append(ipaddress.IPv4Network(parts[parts.index("inet") + 1], strict=False))
    routes = run(["ip", "-4", "route", "show"], "list routes").stdout
    for line in routes.splitlines():
        first = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if first != "default":
                networks.append(ipaddress.IPv4Network(first, strict=False))
    return networks


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.200.0.0/13 that no interface or route here uses (other engineers may run
    the benchmark at the same time)."""
    used = _used_networks()
    for _ in range(200):
        second, third = 200 + secrets.randbelow(8), secrets.randbelow(256)
        candidate = ipaddress.IPv4Network(f"10.{second}.{third}.{4 * secrets.randbelow(64)}/30")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise HarnessError("shaped link: no free /30 in 10.200.0.0/13")


def _measure(url: str, blob_path: str | None) -> dict[str, float]:
    """TCP connect time (one round trip) and whole-blob GET throughput."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    rtts = []
    for _ in range(5):
        start = time.perf_counter()
        with socket.create_connection((host, int(port)), timeout=5):
            rtts.append(time.perf_counter() - start)
    measured = {"rtt_ms": 1000 * statistics.median(rtts)}
    if blob_path is not None:
        start = time.perf_counter()
        total = 0
        with urllib.request.urlopen(url + blob_path, timeout=600) as response:
            while chunk := response.read(1 << 20):
                total += len(chunk)
        measured["get_mb_s"] = total / (time.perf_counter() - start) / 1e6
        measured["get_bytes"] = float(total)
    return measured


@contextlib.contextmanager
def loopback_link(registry_base: Path, probe_blob: str | None = None) -> Iterator[Link]:
    """The harness registry on a free loopback port, serving registry_base/data."""
    registry = start_registry(registry_base)
    try:
        link = Link("loopback", "loopback (no shaping)", registry)
        link.measured = _measure(registry.url, probe_blob)
        yield link
    finally:
        registry.stop()


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    run(argv, "shaped link setup")


@contextlib.contextmanager
def shaped_link(
    registry_base: Path, shape: Shape = Shape(), probe_blob: str | None = None
) -> Iterator[Link]:
    """docker-registry in its own network namespace, serving registry_base/data behind a
    link of the given shape."""
    token = secrets.token_hex(3)
    netns, host_dev, ns_dev = f"lzbench-{token}", f"lzb{token}h", f"lzb{token}n"
    subnet = _free_subnet()
    host_ip, ns_ip = (str(address) for address in subnet.hosts())
    registry_base.mkdir(parents=True, exist_ok=True)
    delay_line: Service | None = None
    registry_service: Service | None = None
    netns_created = False
    try:
        delay_line = spawn(
            "delay line",
            [sys.executable, str(DELAY_LINE), host_dev, ns_dev, str(shape.one_way_delay_ms)],
            registry_base / "delayline.log",
        )
        delay_line.wait_until(
            lambda: all(Path(f"/sys/class/net/{dev}").exists() for dev in (host_dev, ns_dev)),
            "TUN devices exist",
            10,
        )
        _ip("ip", "netns", "add", netns)
        netns_created = True
        _ip("ip", "link", "set", ns_dev, "netns", netns)
        # tbf's burst must hold one whole packet; latency bounds its queue (~2.5 MB here).
        tbf = ["tbf", "rate", f"{shape.rate_mbit}mbit", "burst", "64kb", "latency", "200ms"]
        ends = ((host_dev, host_ip, ns_ip, None), (ns_dev, ns_ip, host_ip, netns))
        for dev, mine, peer, ns in ends:
            _ip("ip", "addr", "add", mine, "peer", peer, "dev", dev, netns=ns)
            _ip("ip", "link", "set", dev, "mtu", str(SHAPED_MTU), "up", netns=ns)
            _ip("tc", "qdisc", "add", "dev", dev, "root", *tbf, netns=ns)
        _ip("ip", "link", "set", "lo", "up", netns=netns)
        config = registry_base / "config-shaped.yml"
        listen = f"{ns_ip}:{SHAPED_REGISTRY_PORT}"
        config.write_text(json.dumps(registry_config(registry_base / "data", listen), indent=1))
        registry_service = spawn(
            "docker-registry (shaped)",
            ["ip", "netns", "exec", netns, REGISTRY_BINARY, "serve", str(config)],
            registry_base / "registry-shaped.log",
        )
        url = f"http://{listen}"
        registry_service.wait_until(lambda: _answers_v2(url), "GET /v2/ answers", 30)
        registry = ShapedRegistry(
            registry_base, SHAPED_REGISTRY_PORT, registry_service, config, address=ns_ip
        )
        link = Link(
            "shaped", f"netns registry at {ns_ip}, {shape.describe()} (tbf + delay line)", registry
        )
        link.measured = _measure(url, probe_blob)
        yield link
    finally:
        if registry_service is not None:
            registry_service.stop()
        if delay_line is not None:
            delay_line.stop()
        if netns_created:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        # Normally gone with the delay line; a leftover host-side device must not linger.
        if Path(f"/sys/class/net/{host_dev}").exists():
            subprocess.run(["ip", "link", "del", host_dev], capture_output=True, check=False)
