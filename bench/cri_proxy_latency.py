"""Latency the CRI image-service proxy (`[cri] image_service_socket`) adds to kubelet's calls.

Starts docker-registry (loopback, harness), pushes busybox, starts containerd with its CRI
plugin and `lazysnap serve` with the proxy in front of it, pulls the image once, then times
PullImage of the already-present image (kubelet's pull of an image the node has: containerd
still resolves the manifest at the registry) and ImageStatus, straight to containerd's socket
and through the proxy, paired in the same run: each trial makes both calls back to back, in
alternating order, over one long-lived channel per path (as kubelet keeps its connection).
Reports the median and p90 of each path and the median of the paired differences.

    sudo /opt/lazysnap-venv/bin/python -m bench.cri_proxy_latency [--trials 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from harness.containerd import start_containerd
from harness.daemon import DaemonSettings, start_lazysnap, write_config
from harness.images import build_busybox, push
from harness.registry import start_registry
from snapshotter._proto.cri.runtime.v1 import pull_pb2

SERVICE = "/runtime.v1.ImageService/"
Call = Callable[[bytes], bytes]


def caller(channel: grpc.Channel, method: str) -> Call:
    call = channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )

    def invoke(request: bytes) -> bytes:
        response: bytes = call(request, timeout=60)
        return response

    return invoke


def paired(direct: Call, proxied: Call, request: bytes, trials: int) -> tuple[list[float], ...]:
    """Seconds per call on each path, and proxied - direct per trial."""
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    for trial in range(trials):
        order = [("direct", direct), ("proxy", proxied)]
        if trial % 2:
            order.reverse()
        for name, call in order:
            start = time.perf_counter()
            call(request)
            times[name].append(time.perf_counter() - start)
    diffs = [p - d for p, d in zip(times["proxy"], times["direct"], strict=True)]
    return times["direct"], times["proxy"], diffs


def ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{Path(__file__).stem}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lzs-bench-cri-", dir="/tmp") as tmp:
        base = Path(tmp)
        registry = start_registry(base / "registry")
        containerd = None
        daemon = None
        try:
            image = push(build_busybox(base / "busybox"), registry.host, "bench/busybox", "v1")
            # The daemon first: containerd dials its snapshotter socket on the first pull.
            hosts_dir = base / "containerd" / "certs.d"  # start_containerd writes it there
            config = write_config(
                base / "lazysnap" / "config.toml",
                base / "lazysnap" / "root",
                base / "lazysnap" / "lazysnap.sock",
                DaemonSettings(hosts_dir=hosts_dir, plain_http=(registry.host,)),
            )
            cri_socket = base / "cri.sock"
            with config.open("a") as f:
                f.write(
                    f'[cri]\nimage_service_socket = "{cri_socket}"\n'
                    f'containerd_cri_socket = "{base / "containerd" / "containerd.sock"}"\n'
                )
            daemon = start_lazysnap(base / "lazysnap", config=config)
            containerd = start_containerd(
                base / "containerd",
                proxy_socket=base / "lazysnap" / "lazysnap.sock",
                registry_hosts=[registry.host],
                cri=True,
            )
            spec = pull_pb2.ImageSpec(image=image.reference)
            pull = pull_pb2.PullImageRequest(image=spec).SerializeToString()
            status = pull_pb2.PullImageRequest(image=spec).SerializeToString()  # same field 1
            with (
                grpc.insecure_channel(f"unix://{containerd.address}") as to_containerd,
                grpc.insecure_channel(f"unix://{cri_socket}") as to_proxy,
            ):
                caller(to_containerd, "PullImage")(pull)  # the image is present from now on
                print(f"{args.trials} paired trials, times in ms (median / p90)")
                print("| call | direct | through the proxy | added (median of pairs) |")
                print("|---|---|---|---|")
                for method, request in (("PullImage", pull), ("ImageStatus", status)):
                    direct = caller(to_containerd, method)
                    proxied = caller(to_proxy, method)
                    paired(direct, proxied, request, args.warmup)
                    d, p, diffs = paired(direct, proxied, request, args.trials)
                    print(
                        f"| {method} | {ms(d, 0.5)} / {ms(d, 0.9)} | {ms(p, 0.5)} / "
                        f"{ms(p, 0.9)} | {statistics.median(diffs) * 1000:+.2f} |"
                    )
        finally:
            if containerd is not None:
                containerd.stop()
            if daemon is not None:
                daemon.stop()
            registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
