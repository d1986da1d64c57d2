"""`lazysnap accel tasks`: the task list, from the job store or from a running service.

The rows are the task API's (record.Job.to_task): what GET /api/v1/conversions answers,
so `--json` output and the HTTP route can be read by the same tools.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from snapshotter.accel.record import STATE_OF_TASK_STATUS


def list_tasks(args: argparse.Namespace, default_store: str) -> int:
    try:
        if args.url:
            tasks = _from_service(args.url, args.status, args.token_file, args.limit)
        else:
            tasks = _from_store(args.store or default_store, args.status, args.limit)
    except _Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tasks = tasks[: args.limit]
    if args.json:
        json.dump(tasks, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(tasks))
    return 0


class _Unavailable(Exception):
    pass


def _from_store(spec: str, statuses: list[str], limit: int) -> list[dict[str, Any]]:
    from snapshotter.accel.store import SqliteJobStore, StoreError, is_postgres

    try:
        if is_postgres(spec):
            from snapshotter.accel.store_postgres import PostgresJobStore

            store: Any = PostgresJobStore(spec)
        else:
            store = SqliteJobStore(spec, read_only=True)
        try:
            jobs = store.jobs([STATE_OF_TASK_STATUS[s] for s in statuses], limit)
        finally:
            store.close()
    except StoreError as exc:
        raise _Unavailable(f"--store: {exc}") from None
    return [job.to_task() for job in jobs]


def _from_service(
    url: str, statuses: list[str], token_file: str | None, limit: int
) -> list[dict[str, Any]]:
    params = {"limit": str(limit)}
    if statuses:
        params["status"] = ",".join(statuses)
    query = "?" + urllib.parse.urlencode(params)
    headers = {"Accept": "application/json"}
    if token_file:
        from snapshotter.accel.token_file import ConfigurationError, read_token

        try:
            headers["Authorization"] = f"Bearer {read_token(token_file)}"
        except ConfigurationError as exc:
            raise _Unavailable(str(exc)) from None
    from snapshotter.remote.service_api import ServiceCallError, get_json

    try:
        doc = get_json(url.rstrip("/") + "/api/v1/conversions" + query, headers, timeout=30)
    except ServiceCallError as exc:
        raise _Unavailable(f"--url {exc}") from None
    if not isinstance(doc, list):
        raise _Unavailable(f"--url {url}: the answer is not a task list")
    return doc


def format_table(tasks: list[dict[str, Any]]) -> str:
    rows = [("ID", "STATUS", "CREATED", "FINISHED", "IMAGE", "REASON / DETAIL")]
    for task in tasks:
        rows.append(
            (
                str(task["id"]),
                str(task["status"]),
                str(task["created"])[:19],
                str(task.get("finished") or "-")[:19],
                str(task.get("source") or task["image"]),
                str(task.get("reason") or task.get("outcome") or ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
