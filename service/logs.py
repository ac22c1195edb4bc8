"""Logging of `kvserve serve`: one handler on the root logger, so kvserve's and uvicorn's records
share one format.

`--log-format text` writes `time level logger: message`; `--log-format json` writes one JSON object
per line (python-json-logger) with `time`, `level`, `logger`, `message` and whatever structured
fields the record carries: the access line's method, route, status, request id, tokens and
latencies; the stats line's per-variant numbers. Records logged while an HTTP request is handled
carry its `request_id` (service.api.middleware sets it). Python warnings are logged too, so a JSON
log stays JSON. uvicorn is started with `log_config=None`, so its loggers propagate here.
"""
from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# the request being handled by the current asyncio task, if any (set by service.api.middleware)
current_request_id: ContextVar[str | None] = ContextVar("kvserve_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    """Adds `request_id` to records logged while a request is handled (the JSON log shows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        # uvicorn adds an ANSI-coloured copy of its messages for its own formatter
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        json_ensure_ascii=False)


def configure_logging(level: str, fmt: str, stream=None) -> None:
    """Route every record to `stream` (stderr) in `fmt` ("text" or "json") at `level` and above."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not one of text, json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
