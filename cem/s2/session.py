"""The CEM side of one S2 session (one per resource-manager connection), without any I/O.

Like ``h11`` or the protocol core of ``websockets``: the websocket server feeds every received
text to `S2Session.receive` and sends the returned `Outgoing` texts; it calls `S2Session.expire`
now and then, drains `S2Session.events` for the planner and the store, and closes the websocket
when `S2Session.close` is set. Nothing here blocks, sleeps or reads the clock: ``now`` is passed in.

How a received message is judged (exactly one ReceptionStatus per message, none for a
ReceptionStatus itself):

1. ``INVALID_DATA``: not UTF-8, not JSON (NaN/Infinity count as not JSON), not a JSON object, or
   no usable ``message_id`` (missing, not a string, or not matching the S2 ID pattern). The
   ReceptionStatus then names the nil UUID ``00000000-0000-0000-0000-000000000000`` as subject,
   as s2-python does, because the schema requires a valid id there.
2. ``INVALID_MESSAGE``: fails the S2 JSON schema: unknown ``message_type``, missing or extra
   fields, wrong types, an id not fully matching ``[a-zA-Z0-9\\-_:]{2,64}``. Checked against the
   schema-faithful generated models of s2-python (``s2python.generated.gen_s2``).
3. ``INVALID_CONTENT``: valid JSON schema but wrong in meaning: a number that is none (NaN,
   infinite, ``"NaN"``/``"-Infinity"`` strings, ``1e400``, beyond ±10^12) or an
   ``operation_mode_factor`` outside 0..1 (`cem.s2.numbers`: the label names the field);
   s2-python's own consistency
   checks (transitions naming unknown operation modes or timers, power ranges upside down, ...),
   FRBC fill-level ranges with gaps or overlaps, unknown actuator / operation mode / timer /
   instruction / object referenced, a commodity quantity the RM did not advertise, a control-type
   message while that control type is not active, a message the CEM sends (not an RM), anything
   before the RM's Handshake.
4. ``TEMPORARY_ERROR``: the CEM cannot take it now (the session is closing, too many future
   versions kept, an internal error).
5. ``OK`` otherwise; the state is updated and events are emitted.

A bad message never ends the session. Only "no common protocol version" (close 1002), a
SessionRequest from either side (1000), an RM that sends no Handshake within
``handshake_timeout_s`` (1008, noticed by `expire`) and ResourceManagerDetails naming a
resource id the connection's credential may not use (`claim`, set by the server: answered
PERMANENT_ERROR, then 1008) end it (`close` is set).

The session itself keeps the handshake, version, control-type selection, revoke, the common
messages (details, measurements, forecasts, instruction statuses, session requests) and the
ReceptionStatus rules; every message of a control type goes to that control type's plug-in
(`cem.control_types`), once the session has checked that it is the active one: the plug-in
judges it (its content rules above) and keeps the per-type state. Likewise the plug-in checks
the CEM's instructions before they are sent.

Ids that are not UUIDs are translated per session (see `cem.s2.ids`); `send` writes them back.
Two deliberate leniencies for interoperability, both for messages the S2 documentation itself
shows: a PEBC limit range may be written high-to-low (``0 .. -4000``), and DDBC operation modes
use the schema's ``Id`` (s2-python 0.11.1 wants an extra ``id`` and a list as ``supply_range``);
their plug-ins adapt the message before it is handed to s2-python.

Events (drained with `S2Session.drain_events`): HandshakeDone, RmDetails, ControlTypeSelected,
StateChanged (the planner may replan), InstructionStatusChanged, ReceptionConfirmed,
ReceptionFailed (the RM refused a CEM message, or "TIMEOUT"), MessageRejected (the CEM refused
an RM message), SessionClosed, ReconnectRequested.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from s2python.common import (
    ControlType,
    EnergyManagementRole,
    Handshake,
    HandshakeResponse,
    InstructionStatusUpdate,
    PowerForecast,
    PowerMeasurement,
    ReceptionStatusValues,
    ResourceManagerDetails,
    RevokeObject,
    SelectControlType,
    SessionRequest,
    SessionRequestType,
)
from s2python.generated.gen_s2 import ReceptionStatus as GeneratedReceptionStatus
from s2python.message import S2Message
from s2python.s2_parser import TYPE_TO_MESSAGE_CLASS

from cem.control_types import (
    DEFAULT_PREFERENCE,
    INSTRUCTION_TYPES,
    NAMES,
    OWNER,
    REFERABLE_TYPES,
    ddbc,
)
from cem.control_types.base import (
    MAX_UPCOMING_VERSIONS,
    Rejected,
    content,
)
from cem.ports import (
    ControlTypeSelected,
    HandshakeDone,
    InstructionStatusChanged,
    MessageRejected,
    ReceptionConfirmed,
    ReceptionFailed,
    ReconnectRequested,
    RmDetails,
    SessionClosed,
    SessionEvent,
    StateChanged,
)
from cem.s2 import json_v1
from cem.s2.ids import (
    NIL_UUID,
    IdTranslator,
    generated_model,
    id_key,
    is_canonical_uuid,
    is_valid_id,
    iter_ids,
    map_ids,
)
from cem.s2.numbers import number_problem_in
from cem.s2.state import RmState
from sitekit.plausible import MAX_MAGNITUDE, number_problem

__all__ = [
    "CEM_ONLY_TYPES", "CEM_SENDABLE_TYPES", "CONTROL_TYPE_NAMES",
    "DEFAULT_CONTROL_TYPE_PREFERENCE", "INSTRUCTION_TYPES", "MAX_UPCOMING_VERSIONS",
    "S2_VERSION", "CloseRequest", "ControlTypeSelected", "HandshakeDone",
    "InstructionStatusChanged", "MessageRejected", "Outgoing", "ReceptionConfirmed",
    "ReceptionFailed", "ReconnectRequested", "RmDetails", "S2Session", "SessionClosed",
    "StateChanged",
]

logger = logging.getLogger("cem.s2")

S2_VERSION = "0.0.2-beta"

CONTROL_TYPE_NAMES: dict[str, ControlType] = {
    **NAMES, "NO_SELECTION": ControlType.NO_SELECTION}
DEFAULT_CONTROL_TYPE_PREFERENCE: tuple[str, ...] = DEFAULT_PREFERENCE

CEM_ONLY_TYPES = INSTRUCTION_TYPES | {"HandshakeResponse", "SelectControlType"}
CEM_SENDABLE_TYPES = CEM_ONLY_TYPES | {"Handshake", "RevokeObject", "SessionRequest"}

_MAX_LABEL = 400
_UUID_IN_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008


# --- what the server sends and reads -----------------------------------------------------------


@dataclass
class Outgoing:
    """One text to send on the websocket."""

    text: str                 # JSON to send on the websocket
    message_id: str | None    # None for ReceptionStatus
    message_type: str
    awaits_status: bool       # True if the peer must answer with a ReceptionStatus


@dataclass
class CloseRequest:
    """The session must end: close the websocket with this code and reason."""

    code: int                 # websocket close code (1000 normal, 1002/1008 protocol/policy)
    reason: str               # plain-words reason, also logged


# --- internals ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    message_type: str
    sent_at: datetime
    deadline: datetime
    message: Any = field(repr=False)


def _aware(now: datetime) -> datetime:
    """Times are UTC-aware inside the CEM; a naive ``now`` is taken as UTC."""
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constants)
_ASCII_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
"""Every ASCII digit to "0", every other byte to " " (for `_has_long_integer`)."""
_LONG_RUN = b"0" * 19


def _has_long_integer(text: str) -> bool:
    """Whether `text` has 19 ASCII digits in a row (the only digits a JSON number has).

    A byte translation and a substring search: ~0.6 µs for a PowerMeasurement, where the
    regular expression ``\\d{19}`` took 3-6 µs (it tries every position)."""
    return _LONG_RUN in text.encode("utf-8", "surrogatepass").translate(_ASCII_DIGITS)


_fast_loads: Callable[[str], Any] | None
try:
    from orjson import loads as _fast_loads
except ImportError:   # orjson is a dependency; without it the standard library parses alone
    _fast_loads = None


def _parse_json(text: str) -> Any:
    """``json.loads(text, parse_constant=_no_constants)``, the same values and errors.

    orjson parses it (~4x faster) when it can; whatever orjson refuses (NaN, 1e400, lone
    surrogates, bad JSON: any error) the standard library parses again, for its verdict and
    its words. A text with 19 digits in a row goes to the standard library at once: orjson
    reads an integer beyond 64 bits as a float, the standard library as the integer."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    if _fast_loads is not None and not _has_long_integer(text):
        try:
            return _fast_loads(text)
        except ValueError:   # orjson.JSONDecodeError is a ValueError
            pass
    return _JSON.decode(text)


_HANDLERS = {
    "Handshake": "_on_handshake",
    "ResourceManagerDetails": "_on_details",
    "PowerMeasurement": "_on_measurement",
    "PowerForecast": "_on_power_forecast",
    "InstructionStatusUpdate": "_on_instruction_status",
    "RevokeObject": "_on_revoke",
    "SessionRequest": "_on_session_request",
}
"""The session's own handler (a method name) per message type; the others go to the active
control type's plug-in. Names, not bound methods kept per session: 1000 sessions, 1000 dicts."""

MEASUREMENT_MARK = '"PowerMeasurement"'
"""In the text of every PowerMeasurement (a cheap test before `measurement_text`; the server's
connection routes text frames by it too)."""
PowerMeasurement.model_rebuild()   # built now, not at the first measurement: read below
_STRICT_MEASUREMENT = PowerMeasurement.__pydantic_validator__.validate_json
"""`PowerMeasurement.model_validate_json` without its Python frame (~0.6 µs a message)."""
_ID_MARK = '"message_id":"'

OK_STATUS = '{"message_type":"ReceptionStatus","subject_message_id":"%s","status":"OK"}'
"""The OK ReceptionStatus exactly as json.dumps writes it, for ids that need no escaping
(`OK_STATUS % message_id`: also the server's answer to a measurement `S2Session.measurement_text`
accepted)."""


def _describe_errors(exc: BaseException) -> str:
    """A short plain-words summary of a pydantic validation error."""
    cause: BaseException = exc
    if not isinstance(cause, ValidationError) and isinstance(cause.__cause__, ValidationError):
        cause = cause.__cause__
    if not isinstance(cause, ValidationError):
        return str(exc)[:_MAX_LABEL]
    parts = []
    for err in cause.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "message"
        message = err.get("msg", "invalid")
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ValueError) and inner.args and isinstance(inner.args[-1], str):
            message = inner.args[-1]
        parts.append(f"{where}: {message}")
    more = cause.error_count() - len(parts)
    text = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return text[:_MAX_LABEL]


class _RmLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every log line with the RM it is about (name and resource id, once known)."""

    def __init__(self, base: logging.Logger, session: S2Session) -> None:
        super().__init__(base, {})
        self.session = session

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        details = self.session.state.details
        if details is None:
            who = "RM (not identified yet)"
        else:
            who = f"RM {details.name or ''} ({self.session.ids.external_of(details.resource_id)})"
        return f"{who}: {msg}", kwargs


# --- the session -------------------------------------------------------------------------------


class S2Session:
    """The CEM's S2 protocol state machine for one resource-manager connection."""

    def __init__(self, *, control_type_preference: list[str] | None = None,
                 versions: tuple[str, ...] = (S2_VERSION,), cem_name: str = "S2 CEM",
                 reception_timeout_s: float = 10.0, handshake_timeout_s: float = 30.0) -> None:
        preference = control_type_preference or list(DEFAULT_CONTROL_TYPE_PREFERENCE)
        self.control_type_preference: list[ControlType] = [
            self._parse_control_type(name) for name in preference]
        self.versions = tuple(versions)
        self.cem_name = cem_name
        self.reception_timeout = timedelta(seconds=reception_timeout_s)
        self.handshake_timeout = timedelta(seconds=handshake_timeout_s)
        self.state = RmState()
        self.ids = IdTranslator()
        self.log = _RmLog(logger, self)
        self.state._rm_ids = lambda: self.ids.translated
        self.events: list[SessionEvent] = []
        self.close: CloseRequest | None = None
        self._started = False
        self._started_at: datetime | None = None
        self._handshake_done = False
        self._pinned: ControlType | None = None   # chosen on demand, kept over details refreshes
        self.s2connect = False   # S2 Connect mode: version set by initiateSession, no Handshake
        self._present_demand_rate: dict[str, Any] | None = None   # v1.0.0 DDBC
        #: set by the server: may this connection's credential use this resource id? (None:
        #: yes; else the reason it may not, answered PERMANENT_ERROR and the session ends)
        self.claim: Callable[[str], str | None] | None = None
        #: (message_type, message_id as the RM wrote it) of the message `receive` last
        #: answered OK, else None: the server logs it without reading the text again
        self.accepted: tuple[str, str] | None = None
        self._advertised: tuple[Any, frozenset[Any]] = (None, frozenset())  # details, its types
        self._refused_text: str | None = None   # the last text `measurement_text` refused
        self._subject = NIL_UUID   # the id and type of the message being judged (`receive`)
        self._subject_type = ""
        self._pending: dict[str, _Pending] = {}

    # --- public API ----------------------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def pending_message_ids(self) -> list[str]:
        """Ids of CEM messages still waiting for their ReceptionStatus."""
        return list(self._pending)

    @property
    def timers_running(self) -> bool:
        """Whether `expire` has anything to watch: a CEM message waiting for its
        ReceptionStatus, or the RM's Handshake (a session that is not closing)."""
        return bool(self._pending) or (not self._handshake_done and self.close is None)

    def drain_events(self) -> list[SessionEvent]:
        """Hand over (and forget) the events gathered so far."""
        events, self.events = self.events, []
        return events

    def start(self, now: datetime) -> list[Outgoing]:
        """The CEM's own Handshake (role CEM), to send as soon as the websocket is open."""
        now = _aware(now)
        if self._started:
            return []
        self._started = True
        self._started_at = now
        self.log.info("%s opens an S2 session, offering protocol versions %s",
                      self.cem_name, ", ".join(self.versions))
        return [self._out(Handshake(message_id=uuid.uuid4(), role=EnergyManagementRole.CEM,
                                    supported_protocol_versions=list(self.versions)), now)]

    def start_s2connect(self, version: str) -> None:
        """S2 Connect mode (before `start`): the version was negotiated by initiateSession, so
        no Handshake is sent or accepted; the RM starts with ResourceManagerDetails."""
        self.s2connect = True
        self._started = True
        self._handshake_done = True
        self.state.protocol_version = version
        self.log.info("S2 Connect session, S2 JSON %s (no Handshake)", version)
        self.events.append(HandshakeDone(version))

    def receive(self, data: str | bytes, now: datetime) -> list[Outgoing]:
        """Judge one received websocket message; returns what to send back. Never raises."""
        if now.tzinfo is None:   # (`_aware`, written out: once per message)
            now = now.replace(tzinfo=UTC)
        self._subject = NIL_UUID
        self._subject_type = ""
        self.accepted = None
        try:
            if type(data) is str and MEASUREMENT_MARK in data:
                if data is self._refused_text:   # refused there already: the full path
                    self._refused_text = None
                else:
                    message_id = self.measurement_text(data)
                    if message_id is not None:
                        self.events.append(StateChanged("measurement", "PowerMeasurement"))
                        return [Outgoing(OK_STATUS % message_id, None, "ReceptionStatus",
                                         False)]
            return self._receive(data, now)
        except Exception as exc:  # a bug here must not kill the connection
            self.log.exception("internal error while handling a %s message",
                                self._subject_type or "received")
            return [self._status(self._subject, ReceptionStatusValues.TEMPORARY_ERROR,
                                 f"CEM could not process the message now: {type(exc).__name__}")]

    def send(self, message: S2Message, now: datetime) -> Outgoing:
        """Serialise a CEM message (ids back to the RM's own), expecting a ReceptionStatus.

        Raises ValueError for messages a CEM does not send, or an instruction for a control
        type that is not active: those are bugs of the caller, not of the RM.
        """
        now = _aware(now)
        message_type = message.message_type
        if message_type not in CEM_SENDABLE_TYPES:
            raise ValueError(f"a CEM does not send {message_type} messages")
        if self.s2connect and message_type in ("Handshake", "HandshakeResponse"):
            raise ValueError(f"no {message_type} in S2 Connect mode")
        # from the fields, not getattr: a pydantic model without the field (a RevokeObject)
        # answers getattr by raising an AttributeError
        factor = getattr(message, "__dict__", {}).get("operation_mode_factor")
        if isinstance(factor, int | float) and not 0 <= factor <= 1:
            raise ValueError(f"cannot send {message_type}: operation_mode_factor {factor} is "
                             "outside 0..1")
        if message_type in INSTRUCTION_TYPES:
            self._check_instruction(message, now)
        elif isinstance(message, SelectControlType):
            self._apply_selection(message.control_type)
        elif isinstance(message, RevokeObject):
            record = self.state.instruction(message.object_id)
            if record is not None:
                record.revoked = True
            self.log.info("revoking %s %s", message.object_type.value,
                           self.ids.external_of(message.object_id))
        elif isinstance(message, SessionRequest) and message.request == SessionRequestType.TERMINATE:
            self._close(CLOSE_NORMAL, message.diagnostic_label or "CEM terminated the session")
        return self._out(message, now)

    def _check_instruction(self, instruction: Any, now: datetime) -> None:
        """An instruction (any plug-in's) goes out only for the active control type, naming only
        what the RM described; it is then recorded."""
        message_type = instruction.message_type
        plugin = OWNER[message_type]
        if self.state.control_type != plugin.control_type:
            raise ValueError(f"cannot send {message_type}: the active control type is "
                             f"{self._ct_name(self.state.control_type)}")
        try:
            plugin.check_instruction(self.state.of(plugin.control_type), instruction, now, self)
        except Rejected as problem:
            raise ValueError(f"cannot send {message_type}: {problem.label}") from None
        self.state._record_instruction(instruction, now)
        self.log.info("sending %s %s", message_type, self.ids.external_of(instruction.id))

    def expire(self, now: datetime) -> None:
        """Turn CEM messages whose ReceptionStatus is overdue into ReceptionFailed events.

        Also ends a session whose RM has not sent its Handshake within handshake_timeout_s.
        """
        now = _aware(now)
        if (not self._handshake_done and self._started_at is not None and self.close is None
                and now >= self._started_at + self.handshake_timeout):
            self._close(CLOSE_POLICY, "the resource manager sent no Handshake within "
                        f"{self.handshake_timeout.total_seconds():g} s")
        for message_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                del self._pending[message_id]
                waited = (now - pending.sent_at).total_seconds()
                diagnostic = (f"no ReceptionStatus for {pending.message_type} within "
                              f"{self.reception_timeout.total_seconds():g} s")
                self.log.warning("%s %s: %s (waited %.1f s)", pending.message_type, message_id,
                                  diagnostic, waited)
                self.events.append(ReceptionFailed(message_id, "TIMEOUT", diagnostic,
                                                   pending.message_type))

    def select_control_type(self, control_type: str | ControlType,
                            now: datetime) -> list[Outgoing]:
        """Switch to another control type the RM offers, or to NO_SELECTION, on demand."""
        now = _aware(now)
        wanted = self._parse_control_type(control_type)
        if wanted != ControlType.NO_SELECTION:
            details = self.state.details
            if details is None:
                raise ValueError("cannot select a control type before ResourceManagerDetails")
            if wanted not in details.available_control_types:
                raise ValueError(f"the resource manager does not offer {wanted.value}; it offers "
                                 + ", ".join(c.value for c in details.available_control_types))
        self._pinned = wanted
        if wanted == self.state.control_type:
            return []
        return [self._select(wanted, now, "asked for")]

    def terminate(self, reason: str, now: datetime) -> list[Outgoing]:
        """End the session: SessionRequest TERMINATE, then the server closes the websocket."""
        now = _aware(now)
        if self.close is not None:
            return []
        message = SessionRequest(message_id=uuid.uuid4(), request=SessionRequestType.TERMINATE,
                                 diagnostic_label=reason[:_MAX_LABEL])
        out = self._out(message, now)
        self._close(CLOSE_NORMAL, reason)
        return [out]

    # --- receiving -----------------------------------------------------------------------------

    def _receive(self, data: str | bytes, now: datetime) -> list[Outgoing]:
        invalid_data = ReceptionStatusValues.INVALID_DATA
        if type(data) is str:
            text = data
        elif isinstance(data, bytes | bytearray | memoryview):
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                return [self._reject(NIL_UUID, "", invalid_data, "message is not UTF-8 text")]
        elif isinstance(data, str):
            text = data
        else:
            return [self._reject(NIL_UUID, "", invalid_data, "message is not text")]
        try:
            raw = _parse_json(text)
        except (ValueError, RecursionError) as exc:
            return [self._reject(NIL_UUID, "", invalid_data, f"message is not JSON: {exc}"[:200])]
        if not isinstance(raw, dict):
            return [self._reject(NIL_UUID, "", invalid_data,
                                 f"message is JSON but not an object ({type(raw).__name__})")]

        message_type = raw.get("message_type")
        if message_type == "ReceptionStatus":
            self._on_reception_status(raw)
            return []

        message_id = raw.get("message_id")
        shown_type = message_type if isinstance(message_type, str) else ""
        if not is_valid_id(message_id):
            return [self._reject(NIL_UUID, shown_type, invalid_data,
                                 "no usable message_id: it must be a string matching "
                                 "[a-zA-Z0-9-_:]{2,64}")]
        self._subject, self._subject_type = message_id, shown_type

        if self.close is not None:
            return [self._reject(message_id, shown_type, ReceptionStatusValues.TEMPORARY_ERROR,
                                 f"session is closing: {self.close.reason}")]

        if message_type == "PowerMeasurement" and self._handshake_done:
            fast = self._measurement_fast(raw, message_id, now)
            if fast is not None:
                return fast

        if json_v1.is_v1(self.state.protocol_version):
            if message_type == json_v1.PRESENT_DEMAND_STATUS:
                return self._on_present_demand_status(raw, message_id)
            raw, problem = json_v1.adapt_v1(raw, self._present_demand_rate)
            if problem is not None:
                return [self._reject(message_id, shown_type,
                                     ReceptionStatusValues.INVALID_MESSAGE, problem)]
        gen = generated_model(message_type) if isinstance(message_type, str) else None
        if gen is None or message_type not in TYPE_TO_MESSAGE_CLASS:
            return [self._reject(message_id, shown_type, ReceptionStatusValues.INVALID_MESSAGE,
                                 f"unknown message_type {message_type!r}"[:_MAX_LABEL])]
        try:
            schema_message = gen.model_validate(raw)
        except (ValidationError, ValueError, TypeError, RecursionError) as exc:
            return [self._reject(message_id, message_type, ReceptionStatusValues.INVALID_MESSAGE,
                                 f"{message_type} does not match the S2 schema: "
                                 f"{_describe_errors(exc)}")]
        for path, value in iter_ids(gen, raw):
            if not is_valid_id(value):
                return [self._reject(message_id, message_type,
                                     ReceptionStatusValues.INVALID_MESSAGE,
                                     f"{path} {str(value)[:70]!r} is not an S2 id "
                                     "([a-zA-Z0-9-_:]{2,64})")]

        if message_type in CEM_ONLY_TYPES:
            return [self._reject(message_id, message_type, ReceptionStatusValues.INVALID_CONTENT,
                                 f"a CEM does not accept {message_type} from a resource manager")]
        if not self._handshake_done and message_type != "Handshake":
            return [self._reject(message_id, message_type, ReceptionStatusValues.INVALID_CONTENT,
                                 f"{message_type} before the handshake: send Handshake first")]

        owner = OWNER.get(message_type)
        if owner is not None:
            try:
                owner.check_schema_message(message_type, schema_message)
            except Rejected as rejection:
                return [self._reject(message_id, message_type, rejection.status,
                                     rejection.label)]
        number = number_problem_in(gen, raw)
        if number is not None:
            return [self._reject(message_id, message_type, ReceptionStatusValues.INVALID_CONTENT,
                                 f"{message_type}: {number}"[:_MAX_LABEL])]

        self.ids.begin()
        try:
            outs, accepted = self._translate_and_handle(raw, gen, message_id, message_type, now)
            if accepted:
                self.ids.commit()
            return outs
        finally:
            self.ids.rollback()

    def _translate_and_handle(self, raw: dict[str, Any], gen: Any, message_id: str,
                              message_type: str, now: datetime) -> tuple[list[Outgoing], bool]:
        """Translate ids, build the s2-python model, apply it; (outgoing, accepted)."""
        body = {k: v for k, v in raw.items() if k != "message_id"}
        translated = map_ids(gen, body, self.ids.to_internal)
        translated["message_id"] = self.ids.to_internal(
            message_id, remember=message_type in REFERABLE_TYPES)
        owner = OWNER.get(message_type)
        if owner is not None:
            translated = owner.adapt(message_type, translated)
        try:
            message = TYPE_TO_MESSAGE_CLASS[message_type].model_validate(translated)
        except Exception as exc:  # s2-python's semantic validators
            label = self._external_text(_describe_errors(exc))
            return [self._reject(message_id, message_type, ReceptionStatusValues.INVALID_CONTENT,
                                 f"{message_type} is inconsistent: {label}")], False

        handler = getattr(self, _HANDLERS.get(message_type, "_on_control_type_message"))
        try:
            follow_up = handler(message, now)
        except Rejected as rejection:
            return [self._reject(message_id, message_type, rejection.status, rejection.label)], False
        if logger.isEnabledFor(logging.DEBUG):
            self.log.debug("accepted %s %s", message_type, message_id)
        self.accepted = (message_type, message_id)
        return [self._status(message_id, ReceptionStatusValues.OK, None), *follow_up], True

    def _measurement_fast(self, raw: dict[str, Any], message_id: str,
                          now: datetime) -> list[Outgoing] | None:
        """A PowerMeasurement (most of what RMs send) judged with one validation instead of
        two: None unless it is accepted, and then `_receive`'s full path judges it.

        The same verdict for the messages it accepts: s2-python's PowerMeasurement is the
        schema's (generated) model with UUID ids and one more rule, the message id was checked
        against the S2 ID pattern already, a PowerMeasurement carries no other id, it has no
        control-type plug-in and JSON v1.0.0 does not change it; its numbers are judged as
        always. Nothing changes before it is accepted (its id is not remembered).
        """
        values = raw.get("values")
        if not isinstance(values, list):
            return None
        for item in values:   # its only numbers (what number_problem_in would judge)
            if not isinstance(item, dict):
                return None
            value = item.get("value")
            # a plain number within the plausible range needs no more (NaN fails both
            # comparisons); anything else is number_problem's to judge
            if not ((type(value) is int or type(value) is float)
                    and -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE) \
                    and number_problem(value) is not None:
                return None
        details = self.state.details
        if details is None:
            return None
        translated = dict(raw)
        translated["message_id"] = self.ids.to_internal(message_id, remember=False)
        try:
            message = PowerMeasurement.model_validate(translated)
        except Exception:  # refused, or s2-python's own error: the full path says which
            return None
        # what `_on_measurement` checks, without its exceptions: s2-python's model refused a
        # commodity quantity given twice already
        advertised = self._advertised_quantities(details)
        for value in message.values:
            if value.commodity_quantity not in advertised:
                return None
        return self._measurement_accepted(message, message_id)

    def _advertised_quantities(self, details: Any) -> frozenset[Any]:
        """The power quantities the RM's details advertise (kept until new details come)."""
        if self._advertised[0] is not details:
            self._advertised = (details, frozenset(details.provides_power_measurement_types))
        return self._advertised[1]

    def _measurement_accepted(self, message: PowerMeasurement,
                              message_id: str) -> list[Outgoing]:
        """Take in a judged PowerMeasurement: the state, its event, the OK answer."""
        self.state._add_measurement(message)
        self.events.append(StateChanged("measurement", "PowerMeasurement"))
        if logger.isEnabledFor(logging.DEBUG):
            self.log.debug("accepted PowerMeasurement %s", message_id)
        self.accepted = ("PowerMeasurement", message_id)
        return [Outgoing(OK_STATUS % message_id, None, "ReceptionStatus", False)]

    def measurement_text(self, text: str) -> str | None:
        """The common PowerMeasurement judged straight from its text: its message id (as
        written) when it is accepted, with the state updated and `accepted` set, but no event
        and no answer (the caller makes them: `receive` appends StateChanged("measurement",
        "PowerMeasurement") and answers `OK_STATUS % message_id`); None, with nothing changed,
        unless it is accepted, and then the full path judges it from the start (its statuses:
        `receive(text, now)`, which does not try the same text here again). Never raises.

        Accepted here only what the full path accepts, with the same answer: s2-python's model
        validated in strict JSON mode (numbers must be JSON numbers, the time an aware
        date-time, no extra fields; a key given twice counts as its last, as the standard
        parser has it), its message id written as the canonical UUID the model read (so the
        RM's spelling is the CEM's: nothing to translate, the answer names it as written), no
        escapes in the text, every value a finite number within the plausible range and of a
        quantity the RM advertised, and a session past its handshake, with details, not
        closing. Nothing changes before it is accepted.
        """
        details = self.state.details
        if details is None or not self._handshake_done or self.close is not None \
                or "\\" in text:
            return self._refuse(text)
        try:
            message = _STRICT_MEASUREMENT(text, strict=True)
        except Exception:   # refused (or pydantic's own error): the full path says which
            return self._refuse(text)
        # the id as written: the one "message_id" in a text without escapes is the key, so its
        # string is what the model read; canonical, it is the CEM's id as it stands
        at = text.find(_ID_MARK) + len(_ID_MARK)
        end = text.find('"', at)
        message_id = text[at:end]
        if at == len(_ID_MARK) - 1 or text.count('"message_id"') != 1 \
                or not is_canonical_uuid(message_id):
            return self._refuse(text)   # spelt otherwise (or twice): translated, or refused
        advertised = self._advertised_quantities(details)
        for value in message.values:
            number = value.value
            if not -MAX_MAGNITUDE <= number <= MAX_MAGNITUDE \
                    or value.commodity_quantity not in advertised:
                return self._refuse(text)   # (NaN fails both comparisons)
        self.state._add_measurement(message)
        if logger.isEnabledFor(logging.DEBUG):
            self.log.debug("accepted PowerMeasurement %s", message_id)
        self.accepted = ("PowerMeasurement", message_id)
        return message_id

    def _refuse(self, text: str) -> str | None:
        """`measurement_text` refused `text` (None): `receive` judges it the full way, not
        here again."""
        self._refused_text = text
        return None

    def _on_reception_status(self, raw: dict[str, Any]) -> None:
        try:
            status = GeneratedReceptionStatus.model_validate(raw)
        except (ValidationError, ValueError, TypeError, RecursionError) as exc:
            self.log.warning("ignoring a malformed ReceptionStatus (never answered): %s",
                              _describe_errors(exc))
            return
        subject = str(status.subject_message_id.root)
        pending = self._pending.pop(subject, None)
        if pending is None:
            self.log.info("ReceptionStatus %s for message %s which the CEM is not waiting for",
                           status.status.value, subject)
            return
        if status.status == ReceptionStatusValues.OK:
            self.log.debug("%s %s received OK", pending.message_type, subject)
            self.events.append(ReceptionConfirmed(subject, pending.message_type))
            return
        diagnostic = status.diagnostic_label or ""
        self.log.warning("answered %s to the CEM's %s %s: %s", status.status.value,
                          pending.message_type, subject, diagnostic or "(no diagnostic)")
        self.events.append(ReceptionFailed(subject, status.status.value, diagnostic,
                                           pending.message_type))
        if (isinstance(pending.message, SelectControlType)
                and self.state.control_type == pending.message.control_type):
            self.log.warning("refused control type %s; nothing is selected now",
                              pending.message.control_type.value)
            self.state._set_control_type(ControlType.NO_SELECTION)
            self.events.append(StateChanged("control_type", "SelectControlType"))

    def _external_text(self, text: str) -> str:
        """Replace the CEM's UUIDs in a diagnostic text by the ids the RM knows."""
        return _UUID_IN_TEXT.sub(lambda m: self.ids.to_external(m.group(0)), text)

    # --- handlers: session messages ------------------------------------------------------------

    def _on_present_demand_status(self, raw: dict[str, Any], message_id: str) -> list[Outgoing]:
        """v1.0.0 DDBC.PresentDemandStatus: the rate goes onto the stored descriptions."""
        kind = json_v1.PRESENT_DEMAND_STATUS
        try:
            message = json_v1.DDBCPresentDemandStatus.model_validate(raw)
        except (ValidationError, ValueError, TypeError) as exc:
            return [self._reject(message_id, kind, ReceptionStatusValues.INVALID_MESSAGE,
                                 f"{kind} does not match the S2 schema: {_describe_errors(exc)}")]
        rate = message.present_demand_rate
        for key in ("start_of_range", "end_of_range"):
            problem = number_problem(raw["present_demand_rate"].get(key))
            if problem is not None:
                return [self._reject(message_id, kind, ReceptionStatusValues.INVALID_CONTENT,
                                     f"{kind}: present_demand_rate.{key} {problem}")]
        if rate.start_of_range > rate.end_of_range:
            return [self._reject(message_id, kind, ReceptionStatusValues.INVALID_CONTENT,
                                 "present_demand_rate starts after it ends")]
        ddbc_type = ddbc.PLUGIN.control_type
        if self.state.control_type != ddbc_type:
            return [self._reject(message_id, kind, ReceptionStatusValues.INVALID_CONTENT,
                                 f"{kind} while the active control type is "
                                 f"{self._ct_name(self.state.control_type)}")]
        self._present_demand_rate = rate.model_dump(mode="json")
        ddbc.PLUGIN.present_demand_rate(self.state.of(ddbc_type), rate)
        self.events.append(StateChanged("status", kind))
        return [self._status(message_id, ReceptionStatusValues.OK, None)]

    def _on_handshake(self, message: Handshake, now: datetime) -> list[Outgoing]:
        if self.s2connect:
            raise content("no Handshake in S2 Connect mode: the version was agreed in "
                          "initiateSession")
        if self._handshake_done:
            raise content("handshake already done in this session")
        if message.role != EnergyManagementRole.RM:
            raise content(f"Handshake with role {message.role.value}: this peer must be an RM")
        offered = list(message.supported_protocol_versions or [])
        common = next((v for v in self.versions if v in offered), None)
        if common is None:
            reason = (f"no common S2 protocol version: the resource manager supports "
                      f"{', '.join(offered) or 'none'}, the CEM supports {', '.join(self.versions)}")
            self._close(CLOSE_PROTOCOL_ERROR, reason)
            raise content(reason)
        out = self.start(now)  # our own Handshake, if the server did not send it yet
        self._handshake_done = True
        self.state.protocol_version = common
        self.log.info("handshake done: using S2 protocol version %s", common)
        self.events.append(HandshakeDone(common))
        response = HandshakeResponse(message_id=uuid.uuid4(), selected_protocol_version=common)
        return [*out, self._out(response, now)]

    def _on_details(self, message: ResourceManagerDetails, now: datetime) -> list[Outgoing]:
        if self.claim is not None:
            refusal = self.claim(self.ids.external_of(message.resource_id))
            if refusal is not None:
                self._close(CLOSE_POLICY, refusal)
                raise Rejected(ReceptionStatusValues.PERMANENT_ERROR, refusal)
        first = self.state.details is None
        self.state._set_details(message)
        self.log.info("%s details; offers %s; measures %s",
                      "sent its" if first else "refreshed its",
                      ", ".join(c.value for c in message.available_control_types) or "nothing",
                      ", ".join(q.value for q in message.provides_power_measurement_types)
                      or "nothing")
        self.events.append(RmDetails(message, self.ids.external_of(message.resource_id),
                                     message.name))
        pinned = self._pinned
        if pinned is not None and (pinned == ControlType.NO_SELECTION
                                   or pinned in message.available_control_types):
            wanted = pinned
        else:
            self._pinned = None
            wanted = self._choose_control_type(message.available_control_types)
        current = self.state.control_type
        if current == wanted:
            return []
        if current is not None and current in message.available_control_types \
                and current != ControlType.NO_SELECTION and wanted != current:
            reason = f"a preferred control type became available ({wanted.value})"
        elif current is not None:
            reason = f"{self._ct_name(current)} is no longer offered"
        else:
            reason = "best match of the preference"
        return [self._select(wanted, now, reason)]

    def _on_measurement(self, message: PowerMeasurement, now: datetime) -> list[Outgoing]:
        details = self.state.details
        if details is None:
            raise content("PowerMeasurement before ResourceManagerDetails")
        advertised = self._advertised_quantities(details)
        seen: set[Any] = set()
        for value in message.values:
            if value.commodity_quantity not in advertised:
                raise content(f"commodity quantity {value.commodity_quantity.value} was not "
                              "advertised in provides_power_measurement_types")
            if value.commodity_quantity in seen:
                raise content(f"commodity quantity {value.commodity_quantity.value} appears "
                              "twice in one PowerMeasurement")
            seen.add(value.commodity_quantity)
        self.state._add_measurement(message)
        self.events.append(StateChanged("measurement", message.message_type))
        return []

    def _on_power_forecast(self, message: PowerForecast, now: datetime) -> list[Outgoing]:
        self.state._power_forecast = message
        self.events.append(StateChanged("forecast", message.message_type))
        return []

    def _on_instruction_status(self, message: InstructionStatusUpdate,
                               now: datetime) -> list[Outgoing]:
        external = self.ids.external_of(message.instruction_id)
        if self.state.instruction(message.instruction_id) is None:
            raise content(f"status for unknown instruction {external}")
        self.state._update_instruction(message)
        self.log.info("instruction %s is now %s", external, message.status_type.value)
        self.events.append(InstructionStatusChanged(external, message.status_type.value))
        return []

    def _on_revoke(self, message: RevokeObject, now: datetime) -> list[Outgoing]:
        kind = message.object_type
        object_id = message.object_id
        external = self.ids.external_of(object_id)
        if kind.value in INSTRUCTION_TYPES:
            raise content(f"only the CEM revokes instructions ({kind.value} {external})")
        owner = OWNER.get(kind.value)
        removed = owner is not None and owner is self.state.plugin and owner.revoke(
            self.state.of(owner.control_type), kind.value, object_id)
        if not removed:
            raise content(f"cannot revoke {kind.value} {external}: the CEM does not know it")
        self.log.info("revoked %s %s", kind.value, external)
        self.events.append(StateChanged("revoked", kind.value))
        return []

    def _on_session_request(self, message: SessionRequest, now: datetime) -> list[Outgoing]:
        label = message.diagnostic_label or "no reason given"
        if message.request == SessionRequestType.RECONNECT:
            self.events.append(ReconnectRequested())
            self._close(CLOSE_NORMAL, f"resource manager asked to reconnect ({label})")
        else:
            self._close(CLOSE_NORMAL, f"resource manager terminated the session ({label})")
        return []

    # --- control types: dispatch to the plug-ins --------------------------------------------

    def external_of(self, value: Any) -> str:
        """The id as the RM wrote it (for the plug-ins' diagnostics)."""
        return self.ids.external_of(value)

    def _on_control_type_message(self, message: Any, now: datetime) -> list[Outgoing]:
        """A message of a control type: its plug-in judges it, if that type is the active one."""
        message_type = message.message_type
        plugin = OWNER[message_type]
        if self.state.control_type != plugin.control_type:
            raise content(f"{message_type} while the active control type is "
                          f"{self._ct_name(self.state.control_type)}")
        kind = plugin.receive(self.state.of(plugin.control_type), message, now, self)
        self.events.append(StateChanged(kind, message_type))
        return []

    # --- control type selection ----------------------------------------------------------------

    @staticmethod
    def _parse_control_type(name: str | ControlType) -> ControlType:
        if isinstance(name, ControlType):
            return name
        key = str(name).strip().upper()
        if key in CONTROL_TYPE_NAMES:
            return CONTROL_TYPE_NAMES[key]
        try:
            return ControlType(key)
        except ValueError:
            raise ValueError(f"unknown control type {name!r}; use one of "
                             + ", ".join(CONTROL_TYPE_NAMES)) from None

    @staticmethod
    def _ct_name(control_type: ControlType | None) -> str:
        return control_type.value if control_type is not None else "none (not selected yet)"

    def _choose_control_type(self, available: list[ControlType]) -> ControlType:
        for preferred in self.control_type_preference:
            if preferred in available and preferred not in (
                    ControlType.NOT_CONTROLABLE, ControlType.NO_SELECTION):
                return preferred
        if ControlType.NOT_CONTROLABLE in available:
            return ControlType.NOT_CONTROLABLE
        return ControlType.NO_SELECTION

    def _apply_selection(self, control_type: ControlType) -> None:
        previous = self.state.control_type
        self.state._set_control_type(control_type)
        if previous != control_type:
            self.events.append(ControlTypeSelected(control_type.value))
            self.events.append(StateChanged("control_type", "SelectControlType"))

    def _select(self, control_type: ControlType, now: datetime, reason: str) -> Outgoing:
        previous = self.state.control_type
        if previous is not None and previous != control_type:
            self.log.info("switching control type from %s to %s (%s); state of %s dropped",
                           previous.value, control_type.value, reason, previous.value)
        else:
            self.log.info("selecting control type %s (%s)", control_type.value, reason)
        message = SelectControlType(message_id=uuid.uuid4(), control_type=control_type)
        return self.send(message, now)

    # --- sending -------------------------------------------------------------------------------

    def _out(self, message: Any, now: datetime) -> Outgoing:
        if self.ids.translates:
            data = json.loads(message.to_json())
            gen = generated_model(message.message_type)
            if gen is not None:
                data = map_ids(gen, data, self.ids.to_external)
            text = json.dumps(data, separators=(",", ":"))
            message_id = data["message_id"]
        else:  # an RM that gave only UUIDs: its ids are the CEM's (one dump, ~4 us not ~27)
            text = message.to_json()
            message_id = id_key(message.message_id)
        self._pending[message_id] = _Pending(message.message_type, now,
                                             now + self.reception_timeout, message)
        return Outgoing(text, message_id, message.message_type, True)

    def _status(self, subject: str, status: ReceptionStatusValues,
                label: str | None) -> Outgoing:
        if status is ReceptionStatusValues.OK and not label and is_valid_id(subject):
            return Outgoing(OK_STATUS % subject, None, "ReceptionStatus", False)
        data: dict[str, Any] = {"message_type": "ReceptionStatus",
                                "subject_message_id": subject, "status": status.value}
        if label:
            data["diagnostic_label"] = label[:_MAX_LABEL]
        return Outgoing(json.dumps(data, separators=(",", ":")), None, "ReceptionStatus", False)

    def _reject(self, subject: str, message_type: str, status: ReceptionStatusValues,
                label: str) -> Outgoing:
        self.log.warning("CEM answered %s to its %s %s: %s", status.value, message_type or "message",
                          subject, label)
        self.events.append(MessageRejected(subject, message_type, status.value, label))
        return self._status(subject, status, label)

    def _close(self, code: int, reason: str) -> None:
        if self.close is not None:
            return
        self.log.info("ending S2 session: %s", reason)
        self.close = CloseRequest(code, reason)
        self.events.append(SessionClosed(reason))
