"""The `lazysnap accel` command line (wired into cli.py by `_add_accel`):

    accel serve --listen HOST:PORT [--plain-http] [--hosts-dir DIR] [--jobs N]
                [--state-dir DIR] [--store PATH | --store postgresql://...] [--lease SECONDS]
                [--min-layer-size N] [--span-size N] [--token-file F] [--cache-repo REPO]...
                [--no-shared-cache]
                [--layer-jobs N] [--max-attempts N] [--retry-backoff SECONDS]
                [--allow-registry HOST]... [--reconcile REGISTRY/REPO]...
                [--reconcile-interval SECONDS] [--reconcile-rate N]
                [--drain-timeout SECONDS] [--log-level LEVEL]
    accel convert IMAGE... [--plain-http] [--json] [index build flags]
    accel tasks [--status S]... [--store PATH | --store postgresql://... | --url URL]
                [--token-file F] [--json]

Exit status: 0 after SIGTERM/SIGINT (serve) or a listing (tasks), 2 bad arguments or
configuration (message names the flag or file), 1 the listen address cannot be bound or the
store / service cannot be reached. Registry credentials come from the docker config.json
($DOCKER_CONFIG or ~/.docker), as for `lazysnap index build`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from snapshotter.cli_types import (
    add_min_layer_size_argument,
    add_span_size_argument,
    at_least_one,
)
from snapshotter.indexer.command import (
    add_cache_arguments,
    add_sign_key_argument,
    add_static_profile_argument,
)
from snapshotter.log import LOG_LEVELS

DEFAULT_LISTEN = "127.0.0.1:2077"
DEFAULT_STATE_DIR = "/var/lib/lazysnap/accel"
STORE_FILE = "jobs.sqlite"
TASK_STATUSES = ("queued", "running", "succeeded", "failed")


def listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT`; port 0 picks a free port (logged at start)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"invalid --listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:2077 or [::1]:2077"
        )
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise argparse.ArgumentTypeError(f"invalid --listen {text!r}: empty host")
    return host, int(port)


def _reconcile_repository(text: str) -> str:
    from snapshotter.remote.errors import InvalidReference
    from snapshotter.remote.reference import Repository

    try:
        repository = Repository.parse(text)
    except InvalidReference as exc:
        raise argparse.ArgumentTypeError(f"invalid --reconcile {text!r}: {exc}") from None
    return str(repository)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}") from None
    if not 0.01 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"rate must be within 0.01..1000 per second, got {text!r}")
    return value


def _lease(text: str) -> float:
    value = _seconds(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--lease must be at least 1 second, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds must be within 0..3600, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` sub-subcommand to the `accel` command's parser."""
    sub = parser.add_subparsers(
        dest="accel_command", metavar="{serve,tasks,convert}", required=True
    )
    _add_tasks(sub)
    _add_convert(sub)
    serve = sub.add_parser(
        "serve",
        help="index images as they are pushed (registry notification webhooks)",
        description="Receive docker distribution notifications (or Harbor webhooks) on POST "
        "/events and index every pushed image, all platforms, like `lazysnap index build`. "
        "GET /status lists queued, running, done and failed jobs; GET /healthz answers 200 "
        "while the workers live. See docs/acceleration-service.md.",
    )
    serve.add_argument(
        "--listen",
        type=listen_address,
        default=listen_address(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"address for webhooks and status (default {DEFAULT_LISTEN}; port 0: any free)",
    )
    serve.add_argument(
        "--plain-http", action="store_true", help="talk plain http to the registries"
    )
    serve.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where the default job store lives (default {DEFAULT_STATE_DIR})",
    )
    serve.add_argument(
        "--store",
        metavar="PATH|postgresql://...",
        help=f"job store: an SQLite file for one replica (default DIR/{STORE_FILE}), or a "
        "PostgreSQL connection URL that several replicas share",
    )
    serve.add_argument(
        "--lease",
        type=_lease,
        default=60.0,
        metavar="SECONDS",
        help="a running job's lease, renewed while its worker lives; when a replica dies "
        "its jobs run elsewhere after this long (default 60)",
    )
    serve.add_argument(
        "--reconcile",
        action="append",
        default=[],
        type=_reconcile_repository,
        metavar="REGISTRY/REPO",
        help="every --reconcile-interval, queue this repository's tagged images that have "
        "no index yet: heals missed webhooks (repeatable)",
    )
    serve.add_argument(
        "--reconcile-interval",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="time between two reconcile passes (default 3600)",
    )
    serve.add_argument(
        "--reconcile-rate",
        type=_rate,
        default=2.0,
        metavar="N",
        help="registry requests per second a reconcile pass makes at most (default 2)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for running jobs to finish, then give them back "
        "to the store (default 600)",
    )
    serve.add_argument(
        "--hosts-dir",
        metavar="DIR",
        help="containerd-style hosts directory (DIR/<host>/hosts.toml)",
    )
    serve.add_argument(
        "--jobs",
        type=at_least_one("--jobs"),
        default=1,
        metavar="N",
        help="images indexed at the same time (default 1)",
    )
    _add_indexing_arguments(serve)
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="shared bearer token webhook callers must send (Authorization: Bearer ...)",
    )
    serve.add_argument(
        "--allow-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="only index images of this registry (repeatable; default: any registry a "
        "webhook names)",
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="stderr log level (default info)"
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="stderr lines as text or as JSON objects with a job field (default text)",
    )


def _add_tasks(sub: Any) -> None:
    tasks = sub.add_parser(
        "tasks",
        help="list the acceleration service's tasks",
        description="List the tasks (jobs) of the acceleration service, newest first, from "
        "its store (read-only, also while it runs) or from a running service's "
        "GET /api/v1/conversions.",
    )
    tasks.add_argument(
        "--status",
        action="append",
        choices=TASK_STATUSES,
        default=[],
        help="only tasks in this status (repeatable)",
    )
    where = tasks.add_mutually_exclusive_group()
    where.add_argument(
        "--store",
        metavar="PATH|postgresql://...",
        help=f"the service's job store (default {DEFAULT_STATE_DIR}/{STORE_FILE})",
    )
    where.add_argument("--url", metavar="URL", help="a running service, e.g. http://host:2077")
    tasks.add_argument(
        "--token-file", metavar="FILE", help="bearer token for --url (as the service's)"
    )
    tasks.add_argument(
        "--limit",
        type=at_least_one("--limit"),
        default=500,
        metavar="N",
        help="the newest N tasks (default 500)",
    )
    tasks.add_argument("--json", action="store_true", help="the task list as JSON")


def _add_indexing_arguments(parser: argparse.ArgumentParser) -> None:
    """How an image is indexed and retried: the same for `accel serve` and `accel convert`,
    so a one-time conversion does exactly what a task of the service does."""
    parser.add_argument(
        "--layer-jobs",
        type=at_least_one("--layer-jobs"),
        default=os.cpu_count() or 1,
        metavar="N",
        help="layers of one image indexed in parallel (default: CPU count)",
    )
    add_min_layer_size_argument(parser)
    add_span_size_argument(parser)
    add_cache_arguments(parser)  # as for `index build`; pushes to them are never indexed
    add_sign_key_argument(parser)
    add_static_profile_argument(parser)
    parser.add_argument(
        "--max-attempts",
        type=at_least_one("--max-attempts"),
        default=5,
        metavar="N",
        help="attempts per image when the registry is unreachable or fails (default 5)",
    )
    parser.add_argument(
        "--retry-backoff",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="wait before the first retry, doubled for each next one (default 2)",
    )


def _add_convert(sub: Any) -> None:
    convert = sub.add_parser(
        "convert",
        help="index images once, as the service's tasks would (no service, no store)",
        description="The one-time mode (acceld's `accelctl convert`): index each IMAGE, every "
        "platform, exactly as a task of `accel serve` does, and print the results as task rows "
        "(--json: the objects GET /api/v1/conversions lists). Exit status 1 if one failed.",
    )
    convert.add_argument("images", nargs="+", metavar="IMAGE", help="image reference")
    convert.add_argument(
        "--plain-http", action="store_true", help="talk plain http to the registries"
    )
    convert.add_argument("--hosts-dir", metavar="DIR", help="containerd-style hosts directory")
    _add_indexing_arguments(convert)
    convert.add_argument("--json", action="store_true", help="the task rows as JSON")


def run(args: argparse.Namespace) -> int:
    if args.accel_command == "convert":
        from snapshotter.accel.convert import run as convert

        return convert(args)
    if args.accel_command == "tasks":
        from snapshotter.accel.tasks_cli import list_tasks

        return list_tasks(args, DEFAULT_STATE_DIR + "/" + STORE_FILE)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    # Imported here so `lazysnap --help` and other subcommands stay fast.
    import logging
    import secrets
    import signal
    import socket
    import threading
    import time

    from snapshotter.accel.http_api import EVENTS_PATH
    from snapshotter.accel.jobs import JobQueue
    from snapshotter.accel.metrics import AccelMetrics
    from snapshotter.accel.open_store import open_store
    from snapshotter.accel.server import AccelService, ServiceConfig
    from snapshotter.accel.store import StoreError
    from snapshotter.accel.token_file import ConfigurationError, read_token
    from snapshotter.accel.worker import RegistryClients, WorkerOptions
    from snapshotter.log import setup_logging
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.remote.errors import RegistryError
    from snapshotter.trust.keys import TrustKeyError, load_signing_key

    setup_logging(args.log_level)
    # The indexer and registry client log under their module names: show their warnings.
    library = logging.getLogger("snapshotter")
    library.handlers[:] = logging.getLogger("lazysnap").handlers
    library.setLevel(max(logging.WARNING, logging.getLogger("lazysnap").level))
    library.propagate = False
    log = logging.getLogger("lazysnap.accel")
    if args.log_format == "json":
        from snapshotter.accel.logs import use_json

        use_json(logging.getLogger("lazysnap"))  # the library logger shares its handler

    try:
        if args.hosts_dir is not None and not os.path.isdir(args.hosts_dir):
            raise ConfigurationError(f"--hosts-dir {args.hosts_dir}: not a directory")
        token = read_token(args.token_file) if args.token_file else None
        access = RegistryAccess.create(hosts_dir=args.hosts_dir)
        credentials = access.credentials()
        sign_key = load_signing_key(args.sign_key) if args.sign_key else None
    except (ConfigurationError, RegistryError, TrustKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    host, port = args.listen
    config = ServiceConfig(
        host=host,
        port=port,
        workers=args.jobs,
        token=token,
        allowed_registries=frozenset(args.allow_registry),
        worker_options=WorkerOptions(
            span_size=args.span_size,
            min_layer_size=args.min_layer_size,
            layer_jobs=args.layer_jobs,
            cache_repos=tuple(args.cache_repo),
            shared_cache=args.shared_cache,
            sign_key=sign_key,
            static_profile=args.static_profile,
        ),
    )
    store_spec = args.store or os.path.join(args.state_dir, STORE_FILE)
    try:
        store = open_store(store_spec)
    except StoreError as exc:
        print(f"error: --store: {exc}", file=sys.stderr)
        return 1
    clients = RegistryClients(access, credentials, plain_http=args.plain_http)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
    queue = JobQueue(
        store,
        owner=owner,
        clock=time.time,
        max_attempts=args.max_attempts,
        backoff_seconds=args.retry_backoff,
        lease_seconds=args.lease,
        poll_seconds=min(1.0, args.lease / 4),
    )
    try:
        service = AccelService(config, clients, queue, AccelMetrics(store, time.time))
    except OSError as exc:
        store.close()
        print(
            f"error: --listen {host}:{port}: cannot listen: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    try:
        counts = store.counts().by_state
    except StoreError as exc:
        store.close()
        print(f"error: --store: {exc}", file=sys.stderr)
        return 1
    log.info(
        "%s: %d queued, %d interrupted job(s) resumed (worker %s)",
        store.description,
        counts["queued"],
        store.recovered,
        owner,
    )

    if args.reconcile:
        from snapshotter.accel.reconcile import ReconcileOptions, Reconciler
        from snapshotter.remote.reference import Repository

        service.reconciler = Reconciler(
            clients,
            queue.submit,
            ReconcileOptions(
                tuple(Repository.parse(text) for text in args.reconcile),
                interval_seconds=args.reconcile_interval,
                per_second=args.reconcile_rate,
                cache_repos=tuple(args.cache_repo),
            ),
            clock=time.monotonic,
            sleep=service.stopping.wait,
        )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    bound_host, bound_port = service.address
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info(
        "listening on http://%s:%d%s (%d worker%s, token %s)",
        shown,
        bound_port,
        EVENTS_PATH,
        args.jobs,
        "" if args.jobs == 1 else "s",
        "required" if token else "not required",
    )
    if sign_key is not None:
        log.info("signing index artifacts with key %s", sign_key.public.key_id)
    else:
        log.warning(
            "no --sign-key: index artifacts are pushed unsigned (nodes in the default trust "
            "mode will not use them)"
        )
    stop.wait()
    log.info("stopping: running jobs finish, queued ones stay in the store")
    service.stop(grace_seconds=args.drain_timeout)
    store.close()
    log.info("stopped")
    return 0
