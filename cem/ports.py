"""The seams between the CEM's layers, declared once (docs/adr/0005-seams.md).

What crosses a seam is declared here and nowhere else; both sides import this module and
nothing of each other:

- **The RM registry** (`RmRegistry`): what the control loop needs from "the RMs": the live
  ones, a read-only view of each (`RmView`, whose `state` is an `RmStateView`), sending a
  message and learning the RM's answer (`InstructionResult`), and the stream of registry
  events (`Connected`, `Disconnected`, `RmEvent` carrying one of the session events below).
  Implemented by the S2 websocket server (`cem.s2.server.S2Server`) and by the digital twin's
  in-process registry (`cem.simulation.twin.TwinRegistry`).
- **The session events** an S2 session reports (`HandshakeDone` ... `ReconnectRequested`).
- **Grid signals** (`GridSignalSource`): prices and congestion limits arrive from sources beside
  the control loop (a CSV, the store's congestion table, a day-ahead feed, an OpenADR VEN); each
  source publishes `SignalUpdate`s, the loop keeps the latest of each source and replans. A new
  feed is one new class implementing `GridSignalSource`.

This module imports nothing of the project: it is the bottom of the CEM's layers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

# --- what an S2 session reports ------------------------------------------------------------------


@dataclass
class SessionEvent:
    """Base of everything an S2 session reports to the rest of the CEM."""


@dataclass
class HandshakeDone(SessionEvent):
    version: str


@dataclass
class RmDetails(SessionEvent):
    """The RM sent (or refreshed) its ResourceManagerDetails."""

    details: Any                      # s2python ResourceManagerDetails, ids as UUIDs
    resource_id: str = ""             # the RM's resource_id exactly as the RM sent it
    name: str | None = None


@dataclass
class ControlTypeSelected(SessionEvent):
    control_type: str         # ControlType value, e.g. "FILL_RATE_BASED_CONTROL"


@dataclass
class StateChanged(SessionEvent):
    """Something the planner plans with changed; it may replan.

    kind is one of: system_description, status, forecast, target, measurement, leakage, timer,
    power_constraints, energy_constraint, power_profile, revoked, control_type.
    """

    kind: str
    message_type: str = ""


@dataclass
class InstructionStatusChanged(SessionEvent):
    instruction_id: str       # as the RM knows it
    status: str               # InstructionStatus value, e.g. "ACCEPTED"


@dataclass
class ReceptionFailed(SessionEvent):
    """The RM rejected a CEM message, or did not answer in time (status "TIMEOUT")."""

    message_id: str
    status: str
    diagnostic: str
    message_type: str = ""

    @property
    def diagnostic_label(self) -> str:
        return self.diagnostic


@dataclass
class ReceptionConfirmed(SessionEvent):
    """The RM answered OK to a CEM message."""

    message_id: str
    message_type: str


@dataclass
class MessageRejected(SessionEvent):
    """The CEM answered a received message with a ReceptionStatus other than OK."""

    message_id: str
    message_type: str
    status: str
    diagnostic: str


@dataclass
class SessionClosed(SessionEvent):
    reason: str


@dataclass
class ReconnectRequested(SessionEvent):
    pass


# --- the RM registry -----------------------------------------------------------------------------


@dataclass
class InstructionResult:
    """How an RM answered a message from the CEM.

    `status` is the ReceptionStatus value ("OK", "INVALID_CONTENT", ...), or "TIMEOUT" (no answer
    within the reception timeout), "NOT_CONNECTED" (no such live RM), "CLOSED" (the connection
    ended before the answer), "NOT_SENT" (the session refused to send it: see diagnostic_label).
    """

    rm_id: str
    message_id: str | None
    status: str
    diagnostic_label: str | None = None
    round_trip_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def describe(self) -> str:
        return self.status + (f" ({self.diagnostic_label})" if self.diagnostic_label else "")


@runtime_checkable
class RmStateView(Protocol):
    """What one RM told the CEM, read-only (`cem.s2.state.RmState` implements it).

    The accessors common to every control type; those of one control type are reached through
    `of(control_type)`, and `plugin` is the selected control type's plug-in (see
    `cem.control_types`).
    """

    @property
    def details(self) -> Any: ...  # s2python ResourceManagerDetails, or None

    @property
    def control_type(self) -> Any: ...  # s2python ControlType, or None

    @property
    def plugin(self) -> Any: ...  # the selected control type's plug-in, or None

    def of(self, control_type: Any) -> Any: ...  # one control type's state (ControlType or name)

    def latest_measurement(self) -> Any: ...  # s2python PowerMeasurement, or None

    def measured_power(self) -> Mapping[Any, Any]: ...

    def power_forecast(self) -> Any: ...

    def instruction_status(self, instruction_id: Any) -> Any: ...


class RmView(Protocol):
    """One live RM as the control loop sees it."""

    @property
    def rm_id(self) -> str | None: ...

    @property
    def name(self) -> str | None: ...

    @property
    def state(self) -> Any: ...  # an RmStateView


@dataclass
class Connected:
    """A connection opened and its S2 session started (not yet identified)."""

    connection_id: str
    peer: str
    holder: str | None


@dataclass
class Disconnected:
    """A connection ended (its session is gone from the registry)."""

    connection_id: str
    rm_id: str | None
    reason: str


@dataclass
class RmEvent:
    """One event from a session, with the RM it belongs to (`rm_id` None before its details)."""

    rm_id: str | None
    connection_id: str
    event: SessionEvent
    at: datetime


RegistryEvent = RmEvent | Connected | Disconnected


class RmRegistry(Protocol):
    """The live RMs, as the control loop talks to them."""

    def rms(self) -> Mapping[str, RmView]:
        """Live, identified RMs by resource id (a read-only mapping; do not copy per call)."""
        ...

    def get(self, rm_id: str) -> RmView | None: ...

    async def send_instruction(self, rm_id: str, message: Any, *, timeout_s: float | None = None,
                               plan_id: int | None = None) -> InstructionResult:
        """Send an S2 message to a live RM; resolves with its ReceptionStatus (or why not)."""
        ...

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue[RegistryEvent]: ...

    def unsubscribe(self, queue: asyncio.Queue[RegistryEvent]) -> None: ...


# --- grid signals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CongestionLimit:
    """A grid operator's limit on the site's import and/or export over a time window (kW)."""

    start: datetime
    end: datetime
    import_limit_kw: float | None = None
    export_limit_kw: float | None = None
    source: str = "config"      # config, cli, api, openadr, ...
    ref: str | None = None      # the source's own id (store window id, OpenADR event id)


@dataclass(frozen=True)
class PriceCurve:
    """Day-ahead wholesale prices (EUR/MWh) per period, as one source published them."""

    points: tuple[tuple[datetime, float], ...]   # (period start UTC, price), sorted
    resolution: timedelta
    source: str

    @property
    def end(self) -> datetime | None:
        return self.points[-1][0] + self.resolution if self.points else None


@dataclass(frozen=True)
class SignalUpdate:
    """What one source knows now; it replaces what that source published before.

    `congestion` None: the source says nothing about limits (a price feed); an empty tuple:
    it has no limits in force. Likewise `prices`.
    """

    source: str
    reason: str                                      # plain words, for the replan's log line
    congestion: tuple[CongestionLimit, ...] | None = None
    prices: PriceCurve | None = None


@dataclass
class SourceState:
    """How a grid-signal source is doing, for `cem status`, the logs and the API."""

    name: str
    kind: str                          # "prices" or "congestion"
    ok: bool = True
    detail: str = ""                   # what it knows, or what is wrong
    last_update: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Publish = Callable[[SignalUpdate], None]


class GridSignalSource(Protocol):
    """A feed of prices or congestion limits beside the control loop.

    `run` publishes what the source knows at once, then every change, until cancelled; it
    handles its own retries (a feed that fails says so in `state()`, it does not raise).
    """

    name: str

    async def run(self, publish: Publish) -> None: ...

    def state(self) -> SourceState: ...
