"""`python -m harness up|down|env BASE`: the local stack for the demo and for debugging.

  up BASE [--no-lazysnap] [--cri] [--trust-key PUB]...
                                    start registry, lazysnap, containerd under BASE; record them
                                    in BASE/stack.json and print shell exports. lazysnap gets
                                    BASE/lazysnap/config.toml: plain http to the registry,
                                    containerd's hosts dir, every indexed layer lazy that is
                                    signed by a --trust-key ([trust] public_keys)
  env BASE                          print the exports again: eval "$(python -m harness env B)"
  down BASE                         stop everything recorded in BASE/stack.json, in order

The programs outlive `up` (own sessions); `down` stops containerd (and our tasks) before
lazysnap, then the registry, and lazy-unmounts anything left under BASE.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.containerd import Containerd, containerd_running_at, start_containerd
from harness.daemon import DaemonSettings, LazysnapDaemon, serve_available, start_lazysnap
from harness.procs import HarnessError, Service, unmount_all_under
from harness.registry import Registry, registry_running_at, start_registry

STATE_FILE = "stack.json"


@dataclass(frozen=True)
class StackRecord:
    registry_port: int
    registry_pid: int
    containerd_pid: int
    namespace: str
    cri: bool
    lazysnap_pid: int | None


def _exports(base: Path, record: StackRecord) -> str:
    values = {
        "LAZYSNAP_BASE": str(base),
        "REGISTRY": f"127.0.0.1:{record.registry_port}",
        "CONTAINERD_ADDRESS": str(base / "containerd" / "containerd.sock"),
        "CONTAINERD_NAMESPACE": record.namespace,
        "CONTAINERD_HOSTS_DIR": str(base / "containerd" / "certs.d"),
        "LAZYSNAP_SOCKET": str(base / "lazysnap" / "lazysnap.sock"),
        "CTR": f"ctr -a {base / 'containerd' / 'containerd.sock'} -n {record.namespace}",
    }
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def up(
    base: Path, with_lazysnap: bool, cri: bool, trust_keys: tuple[Path, ...] = ()
) -> StackRecord:
    base.mkdir(parents=True, exist_ok=True)
    if (base / STATE_FILE).exists():
        raise HarnessError(
            f"{base / STATE_FILE} exists: a stack is already up there (run `down {base}` first)"
        )
    if with_lazysnap and (reason := serve_available()) is not None:
        raise HarnessError(f"cannot start lazysnap: {reason} (use --no-lazysnap)")
    registry: Registry | None = None
    daemon: LazysnapDaemon | None = None
    try:
        registry = start_registry(base / "registry")
        if with_lazysnap:
            # Lazy layers from our registry: `lazysnap index build` + `lazysnap pull` then
            # mount every indexed layer over FUSE (the demo's point).
            settings = DaemonSettings(
                hosts_dir=base / "containerd" / "certs.d",
                plain_http=(registry.host,),
                trust_public_keys=trust_keys,
            )
            daemon = start_lazysnap(base / "lazysnap", settings=settings)
        containerd = start_containerd(
            base / "containerd",
            proxy_socket=base / "lazysnap" / "lazysnap.sock",
            registry_hosts=[registry.host],
            cri=cri,
        )
    except BaseException:
        if daemon is not None:
            daemon.stop()
        if registry is not None:
            registry.stop()
        unmount_all_under(base)
        raise
    record = StackRecord(
        registry.port,
        registry.service.pid,
        containerd.service.pid,
        containerd.namespace,
        cri,
        daemon.pid if daemon else None,
    )
    (base / STATE_FILE).write_text(json.dumps(record.__dict__, indent=1))
    return record


def load(base: Path) -> StackRecord:
    try:
        return StackRecord(**json.loads((base / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise HarnessError(f"{base / STATE_FILE}: no stack recorded there ({exc})") from exc


def down(base: Path) -> None:
    record = load(base)
    containerd: Containerd = containerd_running_at(
        base / "containerd",
        record.containerd_pid,
        record.namespace,
        base / "lazysnap" / "lazysnap.sock",
        record.cri,
    )
    containerd.stop()  # first: its mounts may sit on lazysnap's FUSE layers
    if record.lazysnap_pid is not None:
        Service("lazysnap serve", record.lazysnap_pid, base / "lazysnap" / "lazysnap.log").stop()
    registry_running_at(base / "registry", record.registry_port, record.registry_pid).stop()
    unmount_all_under(base)
    (base / STATE_FILE).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start registry + lazysnap + containerd under BASE")
    up_parser.add_argument("base", type=Path)
    up_parser.add_argument(
        "--no-lazysnap", action="store_true", help="do not start the lazysnap daemon"
    )
    up_parser.add_argument("--cri", action="store_true", help="enable containerd's CRI plugin")
    up_parser.add_argument(
        "--trust-key",
        action="append",
        type=Path,
        default=[],
        metavar="PUB",
        help="public key whose index signatures lazysnap trusts (repeatable; none: every "
        "index falls back, the daemon's secure default)",
    )
    for name, text in (("down", "stop the stack under BASE"), ("env", "print shell exports")):
        sub.add_parser(name, help=text).add_argument("base", type=Path)
    args = parser.parse_args(argv)
    base = args.base.resolve()
    try:
        if args.command == "up":
            keys = tuple(key.resolve() for key in args.trust_key)
            sys.stdout.write(_exports(base, up(base, not args.no_lazysnap, args.cri, keys)))
        elif args.command == "env":
            sys.stdout.write(_exports(base, load(base)))
        else:
            down(base)
    except HarnessError as exc:
        print(f"harness {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
