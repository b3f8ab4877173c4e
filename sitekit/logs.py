"""One log format for every long-running `cem` process (the CEM, the RMs, the simulators).

Text (the default): `2026-03-01T14:05:09.123+01:00 INFO    cem.s2.server: message`, ISO 8601
with the local zone's offset, so lines from several hosts or containers sort and compare.
JSON (`--log-format json`, for log shippers): one object per line with `time`, `level`,
`logger`, `message`, and `part` / `error` / `traceback` when there are any.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
HANDLER_NAME = "cem-logs"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: libraries whose per-connection or per-frame lines would drown ours
NOISY = ("websockets", "cem.s2.websockets", "s2python", "aiosqlite", "ocpp", "pymodbus",
         "uvicorn.access", "httpx", "httpcore")


def iso_time(created: float) -> str:
    """Epoch seconds -> ISO 8601 in the local zone, with milliseconds and offset."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`<ISO time with zone> <LEVEL> <logger>: <message>` (+ traceback lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{iso_time(record.created)} {record.levelname:<7} {record.name}: "
                f"{record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        part = getattr(record, "part", None)
        if part:
            entry["part"] = part
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = repr(record.exc_info[1])
            entry["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None,
              quiet: Iterable[str] = NOISY) -> None:
    """Set the root logger's one handler, level and format; raise ValueError on a bad name."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use {' or '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:  # ours from before; others (a test's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in quiet:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
