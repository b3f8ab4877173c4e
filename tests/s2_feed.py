"""Feeding RM messages into a sans-I/O S2 session in tests, every one answered OK."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cem.s2.session import S2Session


def uid() -> str:
    return str(uuid.uuid4())


def feeder(now: datetime) -> Callable[[S2Session, Any], None]:
    """feed(session, message): the session receives it at `now` and must answer OK."""

    def feed(session: S2Session, message: Any) -> None:
        outs = session.receive(message.to_json(), now)
        statuses = [json.loads(o.text) for o in outs if o.message_type == "ReceptionStatus"]
        assert all(s["status"] == "OK" for s in statuses), statuses

    return feed
