"""Logs: one JSON object a line (`logging.json: true`) with the current trace and span ids, or
plain lines; `configure_logging` installs either on the root logger."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from opentelemetry import trace


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, with the current trace and span ids when a span is active."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, json_format: bool) -> None:
    import time

    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
