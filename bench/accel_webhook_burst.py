"""A burst of registry webhooks at `lazysnap accel serve`: how fast every one is answered
(each answer means the job is committed to the store) and whether every image was kept.

    python -m bench.accel_webhook_burst                          # 1000 webhooks, SQLite store
    python -m bench.accel_webhook_burst --webhooks 1000 --senders 8 --json burst.json
    python -m bench.accel_webhook_burst --store postgresql://user@127.0.0.1:5432/db

The service is started here (its own temp state dir; port 0) with 2 workers. The webhooks
name distinct images of a registry address nobody listens on, so the workers stay busy
failing fast and retrying, as they would during a registry outage, while the burst comes
in: the intake competes with them for the CPU and the store. --senders clients post at
once over keep-alive connections (docker distribution sends one endpoint's events in order;
Harbor and several registries send in parallel). After the burst the service is stopped with
SIGTERM and the store is read back (`lazysnap accel tasks --json`): every image must be
there. Prints a markdown table; exit status 1 if a webhook was not answered 202 or an image
is missing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/events")


def envelope(registry: str, n: int) -> bytes:
    digest = "sha256:" + f"{n:064x}"
    repository = f"burst/app{n % 50}"
    event = {
        "id": f"burst-{n}",
        "timestamp": "2026-12-06T10:00:00Z",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "repository": repository,
            "url": f"http://{registry}/v2/{repository}/manifests/{digest}",
            "tag": f"v{n}",
        },
        "request": {"host": registry, "method": "PUT"},
    }
    return json.dumps({"events": [event]}).encode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(work: Path, store: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    log_path = work / "accel.log"
    argv = [
        sys.executable,
        "-m",
        "snapshotter.cli",
        "accel",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store,
        "--plain-http",
        "--jobs",
        "2",
        "--max-attempts",
        "3",
        "--retry-backoff",
        "1",
    ]
    env = {**os.environ, "DOCKER_CONFIG": str(work / "docker-config")}
    env.pop("LAZYSNAP_SIGN_KEY", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return proc, int(match.group(1)), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"accel serve did not start; log:\n{log_path.read_text(errors='replace')}")


def burst(port: int, bodies: list[bytes], senders: int) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    start = threading.Barrier(senders)

    def sender() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            began = time.perf_counter()
            conn.request(
                "POST",
                "/events",
                bodies[index],
                {"Content-Type": "application/vnd.docker.distribution.events.v1+json"},
            )
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - began
            with lock:
                latencies.append(took)
                statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def stored_images(store: str, expected: int) -> set[str]:
    argv = [sys.executable, "-m", "snapshotter.cli", "accel", "tasks", "--store", store]
    result = subprocess.run(
        [*argv, "--json", "--limit", str(expected * 2)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return {task["image"] for task in json.loads(result.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{Path(__file__).stem}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--webhooks", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=8, help="concurrent clients")
    parser.add_argument("--store", help="a postgresql:// store (default: SQLite in a temp dir)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lzs-accel-burst-"))
    store = args.store or str(work / "jobs.sqlite")
    registry = f"127.0.0.1:{closed_port()}"
    bodies = [envelope(registry, n) for n in range(args.webhooks)]
    proc, port, log_path = start_service(work, store)
    try:
        began = time.perf_counter()
        latencies, statuses = burst(port, bodies, args.senders)
        wall = time.perf_counter() - began
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    kept = stored_images(store, args.webhooks)
    wanted = {f"{registry}/burst/app{n % 50}@sha256:{n:064x}" for n in range(args.webhooks)}
    missing = len(wanted - kept)
    figures = {
        "webhooks": args.webhooks,
        "senders": args.senders,
        "store": "postgresql" if args.store else "sqlite",
        "wall_seconds": round(wall, 2),
        "per_second": round(args.webhooks / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
        "answered_202": statuses.get(202, 0),
        "other_answers": {str(k): v for k, v in statuses.items() if k != 202},
        "images_in_store": len(kept & wanted),
        "missing": missing,
    }
    print("| webhooks | senders | store | per s | p50 ms | p90 ms | p99 ms | max ms | 202 | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.webhooks} | {args.senders} | {figures['store']} | {figures['per_second']} "
        f"| {figures['p50_ms']} | {figures['p90_ms']} | {figures['p99_ms']} "
        f"| {figures['max_ms']} | {figures['answered_202']} | {missing} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    ok = figures["answered_202"] == args.webhooks and missing == 0
    if not ok:
        print(f"FAILED: {figures}; service log {log_path}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
