"""OCPP-J frames a charger may send that are no OCPP message, and what the central system does.

`screen(raw)` looks at a frame before the ocpp library parses it (whose JSON parser recurses,
so a frame nested 50,000 deep would end the connection) and says what is wrong with it:

- a **binary** frame (OCPP-J frames are text): if it holds a readable call, a CALLERROR with its
  message id; random bytes are dropped with a log line;
- a frame **larger** than `MAX_FRAME_BYTES`, or **nested deeper** than `MAX_DEPTH` (OCPP
  payloads are a few levels deep): a CALLERROR (FormatViolation) with the message id read from
  its start, or dropped when there is none.

Frames that pass go to the library; one that is not JSON is answered with id "-1" (as OCPP-J
prescribes when the id cannot be read), except a broken CallResult or CallError
(`broken_answer`), which is never answered: there is nothing to answer. Nothing here raises.

`FrameLog` keeps what a charger that sends nothing but garbage writes to the log to one line
per `LOG_EVERY_S` with the count of frames it stands for.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

MAX_FRAME_BYTES = 256 * 1024   # larger OCPP frames are refused with a CALLERROR
WEBSOCKET_MAX_BYTES = 4 * 1024 * 1024   # larger still: websockets closes the connection (1009)
MAX_DEPTH = 24
LOG_EVERY_S = 10.0

_CALL_START = re.compile(r'\s*\[\s*2\s*,\s*"([^"\\]{1,36})"')
_ANSWER_START = re.compile(r"\s*\[\s*[34]\s*,")


@dataclass(frozen=True)
class FrameProblem:
    """What is wrong with a frame; `unique_id` None: nothing to answer (dropped)."""

    unique_id: str | None
    code: str          # OCPP-J error code (1.6 spellings are applied when sending)
    description: str


def _text(raw: str | bytes) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


def call_id(text: str) -> str | None:
    """The message id of a frame that starts like a CALL (``[2, "<id>", ...``), or None."""
    match = _CALL_START.match(text[:200])
    return match.group(1) if match else None


def depth(text: str, limit: int) -> int:
    """How deep `text` nests arrays and objects (counted up to `limit` + 1), strings skipped."""
    if text.count("[") + text.count("{") <= limit:
        return 0  # cannot be deeper than this
    deepest = level = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            if level > deepest:
                deepest = level
                if deepest > limit:
                    return deepest
        elif char in "]}":
            level -= 1
    return deepest


def screen(raw: str | bytes) -> FrameProblem | None:
    """What is wrong with a frame before parsing (None: hand it to the library)."""
    text = _text(raw)
    if not isinstance(raw, str):
        unique_id = call_id(text) if text is not None else None
        return FrameProblem(unique_id, "FormatViolation",
                            f"a binary frame of {len(raw)} bytes: OCPP-J frames are text")
    assert text is not None
    size = len(text.encode("utf-8", "replace")) if len(text) * 4 > MAX_FRAME_BYTES else len(text)
    if size > MAX_FRAME_BYTES:
        return FrameProblem(call_id(text), "FormatViolation",
                            f"frame of {size} bytes, more than the {MAX_FRAME_BYTES} this "
                            "central system reads")
    nested = depth(text, MAX_DEPTH)
    if nested > MAX_DEPTH:
        return FrameProblem(call_id(text), "FormatViolation",
                            f"frame nested more than {MAX_DEPTH} levels deep")
    return None


def broken_answer(text: str) -> bool:
    """A frame that starts like a CallResult or CallError (``[3,`` / ``[4,``): never answered."""
    return _ANSWER_START.match(text[:20]) is not None


class FrameLog:
    """At most one log line per `LOG_EVERY_S` about one charger's bad frames (with a count)."""

    def __init__(self, logger: logging.Logger, clock: float | None = None) -> None:
        self.logger = logger
        self._last = -LOG_EVERY_S if clock is None else clock - LOG_EVERY_S
        self._since = 0
        self.count = 0

    def bad_frame(self, cp_id: str, what: str, answered: bool,
                  now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.count += 1
        self._since += 1
        if now - self._last < LOG_EVERY_S:
            return
        more = f" ({self._since - 1} more bad frame(s) since the last line)" if self._since > 1 \
            else ""
        self.logger.warning("charger '%s' sent a frame that is no OCPP message: %s; %s%s",
                            cp_id, what, "answered with a CALLERROR" if answered
                            else "dropped (no message id to answer)", more)
        self._last = now
        self._since = 0
