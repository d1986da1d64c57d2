"""`accel serve --log-format json`: one JSON object per log line, for log pipelines.

Fields: time (UTC, ISO 8601), level, logger, msg, and job (the job id) on every line about
one job (the service logs those through job_log), error (a traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = getattr(record, "job", None)
        if job is not None:
            doc["job"] = job
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def use_json(*loggers: logging.Logger) -> None:
    """Switch the handlers of these loggers to JSON lines."""
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())


def job_log(logger: logging.Logger, job_id: int) -> logging.LoggerAdapter[logging.Logger]:
    """logger, with the job id attached to every record (the JSON format's job field)."""
    return logging.LoggerAdapter(logger, {"job": job_id})
