"""S2 JSON v1.0.0 beside 0.0.2-beta, around s2-python's (0.0.2-beta) models.

The two tagged versions differ in one place: in v1.0.0 ``DDBC.SystemDescription`` has no
``present_demand_rate``; the RM reports it in a message of its own, ``DDBC.PresentDemandStatus``
(``present_demand_rate``: a NumberRange). s2-python 0.11.1 knows only the old shape, so a
session that negotiated v1.0.0:

- checks a v1.0.0 system description has no ``present_demand_rate`` (INVALID_MESSAGE if it
  has), and hands s2-python the description with the latest present demand rate the RM
  reported (0..0 until it reports one) so the flexibility layer reads it where it always did;
- validates ``DDBC.PresentDemandStatus`` with `DDBCPresentDemandStatus` (s2-python's own
  NumberRange inside) and puts the rate on the stored descriptions.

Both versions: ``operation_mode_factor`` is a share of a mode (0 to 1, the schemas say);
s2-python does not check it, the CEM does, in what it receives (`cem.s2.numbers`) and in what
it sends (`cem.s2.session.S2Session.send`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from s2python.common import NumberRange

PRESENT_DEMAND_STATUS = "DDBC.PresentDemandStatus"
_NO_RATE = {"start_of_range": 0, "end_of_range": 0}


@functools.lru_cache(maxsize=16)
def is_v1(version: str | None) -> bool:
    """Whether a negotiated protocol version is S2 JSON v1.0.0 (asked for every message)."""
    return version is not None and version.strip().lower().removeprefix("v") == "1.0.0"


class DDBCPresentDemandStatus(BaseModel):
    """The v1.0.0 message s2-python lacks (wrapping its NumberRange, not a copy of it)."""

    model_config = ConfigDict(extra="forbid")

    message_type: Literal["DDBC.PresentDemandStatus"]
    message_id: str = Field(pattern=r"^[a-zA-Z0-9\-_:]{2,64}$")
    present_demand_rate: NumberRange


def adapt_v1(raw: dict[str, Any], present_rate: dict[str, Any] | None
             ) -> tuple[dict[str, Any], str | None]:
    """A v1.0.0 message in the shape s2-python reads, or the reason it is not v1.0.0."""
    if raw.get("message_type") == "DDBC.SystemDescription":
        if "present_demand_rate" in raw:
            return raw, ("present_demand_rate is not part of DDBC.SystemDescription in S2 JSON "
                         "v1.0.0: send it in DDBC.PresentDemandStatus")
        return {**raw, "present_demand_rate": present_rate or dict(_NO_RATE)}, None
    return raw, None
