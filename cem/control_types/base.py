"""The control-type plug-in interface, and what the plug-ins' session rules share.

One S2 control type (FRBC, PEBC, PPBC, OMBC, DDBC, NOT_CONTROLABLE) is one plug-in: an object
implementing `ControlTypePlugin`, listed in `cem.control_types.PLUGINS`. It brings

(a) its **session rules**: how each of its messages is judged (raise `Rejected` for a
    ReceptionStatus other than OK) and applied to its state, which of the CEM's instructions
    are valid, what a RevokeObject of its objects removes;
(b) its **state**: the per-type part of an RM's state (`TypeState`) with its read-only
    accessors, created when the CEM selects the control type and dropped when it switches;
(c) its **flex binding**: the RM's state -> planner assets and bindings (`add_assets`), the
    power an instruction asks for (`instruction_power_w`); the bindings it creates turn plans
    into instructions and say whether the guard can cap them (`cem.flex.ptu.FlexBinding`).

The S2 session (`cem.s2.session`) keeps the handshake, version, control-type selection,
revoke, ReceptionStatus rules and common messages, and hands every message of a control type
to its plug-in, after checking that this control type is the active one.

Layering: the plug-ins sit above the flexibility models they bind (`cem.flex`) and below the
S2 session that dispatches to them; `cem.flex.site_problem` reaches an RM's plug-in through its
state (`RmStateView.plugin`), so it does not import this package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from s2python.common import ControlType, InstructionStatusUpdate, ReceptionStatusValues

from cem.flex.ptu import sid
from cem.flex.site_problem import SiteBuild
from cem.ports import RmStateView

MAX_UPCOMING_VERSIONS = 100
"""How many not-yet-valid versions of one kind (e.g. system descriptions) the CEM keeps."""


# --- what a rule raises ---------------------------------------------------------------------


class Rejected(Exception):
    """Raised by a session rule: answer with this status instead of OK (state left untouched)."""

    def __init__(self, status: ReceptionStatusValues, label: str) -> None:
        super().__init__(label)
        self.status = status
        self.label = label


def content(label: str) -> Rejected:
    """INVALID_CONTENT with `label` as the diagnostic."""
    return Rejected(ReceptionStatusValues.INVALID_CONTENT, label)


def room_for_upcoming(count: int, what: str) -> None:
    """TEMPORARY_ERROR when `count` future versions of `what` are kept already."""
    if count >= MAX_UPCOMING_VERSIONS:
        raise Rejected(ReceptionStatusValues.TEMPORARY_ERROR,
                       f"already {count} future {what} kept; send again when some are in force")


# --- what a plug-in may ask of the session ------------------------------------------------------


class SessionView(Protocol):
    """The session, as a plug-in's rules see it."""

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """Log lines about this RM (prefixed with its name and resource id)."""
        ...

    def external_of(self, value: Any) -> str:
        """The id as the RM wrote it, for diagnostics (ids are UUIDs inside the CEM)."""
        ...


# --- the per-type state ---------------------------------------------------------------------


class TypeState(Protocol):
    """The per-type part of an RM's state; only its plug-in's rules change it."""

    def snapshot(self) -> dict[str, Any]:
        """All of it as plain JSON types, for the store."""
        ...


class _HasValidFrom(Protocol):
    @property
    def valid_from(self) -> datetime: ...

    @property
    def message_id(self) -> Any: ...


T = TypeVar("T", bound=_HasValidFrom)


class ValidFromHistory(Generic[T]):
    """Versions of one object kind ordered by ``valid_from``; answers "which one is in force".

    "The one in force" at ``now`` is the one with the latest ``valid_from`` not after ``now``.
    Future ones are kept until they come into force; older ones are pruned when a newer one is
    in force.
    """

    def __init__(self) -> None:
        self._items: list[T] = []

    def add(self, item: T, now: datetime) -> None:
        """Keep ``item`` (a later one with the same valid_from replaces the earlier one)."""
        self._items = [i for i in self._items if i.valid_from != item.valid_from]
        self._items.append(item)
        self._items.sort(key=lambda i: i.valid_from)
        self.prune(now)

    def in_force(self, now: datetime) -> T | None:
        """The item with the latest valid_from <= now, or None."""
        current = None
        for item in self._items:
            if item.valid_from <= now:
                current = item
        return current

    def upcoming(self, now: datetime) -> list[T]:
        """Items that come into force after ``now``, earliest first."""
        return [i for i in self._items if i.valid_from > now]

    def next_change(self, now: datetime) -> datetime | None:
        """When the next kept version comes into force after ``now`` (None: none kept)."""
        return min((i.valid_from for i in self._items if i.valid_from > now), default=None)

    def latest(self) -> T | None:
        """The item with the latest valid_from, in force or not."""
        return self._items[-1] if self._items else None

    def all(self) -> list[T]:
        return list(self._items)

    def prune(self, now: datetime) -> None:
        """Forget versions superseded by the one in force at ``now``."""
        current = self.in_force(now)
        if current is not None:
            self._items = [i for i in self._items if i.valid_from >= current.valid_from]

    def drop(self, object_id: Any) -> bool:
        """Remove the version whose message_id is ``object_id``; True if there was one."""
        before = len(self._items)
        self._items = [i for i in self._items if sid(i.message_id) != sid(object_id)]
        return len(self._items) != before

    def versions(self, now: datetime) -> list[T]:
        """The version in force and the upcoming ones: a status may refer to any of them."""
        current = self.in_force(now)
        return ([current] if current is not None else []) + self.upcoming(now)

    def __len__(self) -> int:
        return len(self._items)


def dump(obj: Any) -> Any:
    """An s2-python object as plain JSON types (None stays None)."""
    return obj.to_json_dict() if obj is not None else None


# --- the plug-in ----------------------------------------------------------------------------

S = TypeVar("S", bound=TypeState)


class ControlTypePlugin(Protocol[S]):
    """One S2 control type: its session rules, its state and its flex binding."""

    @property
    def control_type(self) -> ControlType: ...

    @property
    def name(self) -> str:
        """Its short name, as in the config: "FRBC"."""
        ...

    @property
    def snapshot_key(self) -> str | None:
        """Its section in `RmState.snapshot()` ("frbc"), or None for none."""
        ...

    @property
    def message_types(self) -> frozenset[str]:
        """The RM -> CEM messages it judges."""
        ...

    @property
    def instruction_types(self) -> frozenset[str]:
        """The CEM -> RM instructions it checks and binds."""
        ...

    @property
    def referable_types(self) -> frozenset[str]:
        """Of its message types, those a RevokeObject names by their message_id."""
        ...

    # (a) session rules
    def check_schema_message(self, message_type: str, message: Any) -> None:
        """Checks in the RM's own words, before ids are translated (raise `Rejected`)."""
        ...

    def adapt(self, message_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """The message as s2-python's model wants it (ids already translated)."""
        ...

    def receive(self, state: S, message: Any, now: datetime, session: SessionView) -> str:
        """Judge and apply one message of this type; returns the `StateChanged` kind."""
        ...

    def check_instruction(self, state: S, message: Any, now: datetime,
                          session: SessionView) -> None:
        """An instruction of the CEM may only name what the RM described (raise `Rejected`)."""
        ...

    def revoke(self, state: S, object_type: str, object_id: Any) -> bool:
        """Remove a revoked object of this type; False if the CEM does not know it."""
        ...

    def instruction_status(self, state: S, instruction: Any,
                           update: InstructionStatusUpdate) -> None:
        """The RM reported a new status of one of this type's instructions."""
        ...

    # (b) state
    def new_state(self) -> S:
        """An empty state (on selection of this control type)."""
        ...

    # (c) flex binding
    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        """Add the RM's assets and bindings to the site's problem; False when its flexibility
        is not known yet (it is then planned as a fixed load from its forecast or
        measurement)."""
        ...

    def instruction_power_w(self, state: S, message: Any, now: datetime) -> float | None:
        """The electric power an instruction of this type asks for (None: not known)."""
        ...


class PluginBase(Generic[S]):
    """Defaults for a plug-in: nothing to check, adapt, revoke or add; power unknown."""

    control_type: ControlType
    name: str
    snapshot_key: str | None = None
    message_types: frozenset[str] = frozenset()
    instruction_types: frozenset[str] = frozenset()
    referable_types: frozenset[str] = frozenset()
    state_class: Callable[[], S]

    def check_schema_message(self, message_type: str, message: Any) -> None:
        return None

    def adapt(self, message_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def receive(self, state: S, message: Any, now: datetime, session: SessionView) -> str:
        raise NotImplementedError(f"{self.name} has no rule for {message.message_type}")

    def check_instruction(self, state: S, message: Any, now: datetime,
                          session: SessionView) -> None:
        return None

    def revoke(self, state: S, object_type: str, object_id: Any) -> bool:
        return False

    def instruction_status(self, state: S, instruction: Any,
                           update: InstructionStatusUpdate) -> None:
        return None

    def new_state(self) -> S:
        return self.state_class()

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        return False

    def instruction_power_w(self, state: S, message: Any, now: datetime) -> float | None:
        return None


# --- rules several control types share ----------------------------------------------------------


def unique(ids: Iterable[Any], what: str) -> None:
    """INVALID_CONTENT when an id is used twice."""
    seen: set[str] = set()
    for i in ids:
        if sid(i) in seen:
            raise content(f"{what} id {sid(i)} is used twice")
        seen.add(sid(i))


def check_modes_and_transitions(modes: list[Any], transitions: list[Any], timers: list[Any],
                                where: str, session: SessionView) -> None:
    """Operation modes and timers unique; transitions name only known modes and timers."""
    unique([m.id for m in modes], f"{where} operation mode")
    unique([t.id for t in timers], f"{where} timer")
    mode_ids = {sid(m.id) for m in modes}
    timer_ids = {sid(t.id) for t in timers}
    for transition in transitions:
        for end in (transition.from_, transition.to):
            if sid(end) not in mode_ids:
                raise content(f"{where}: transition {session.external_of(transition.id)} "
                              f"names unknown operation mode {session.external_of(end)}")
        for timer in [*transition.start_timers, *transition.blocking_timers]:
            if sid(timer) not in timer_ids:
                raise content(f"{where}: transition {session.external_of(transition.id)} "
                              f"names unknown timer {session.external_of(timer)}")


def actuators(history: ValidFromHistory[Any], actuator_id: Any, now: datetime, kind: str,
              session: SessionView) -> list[Any]:
    """The descriptions of one actuator in every kept version (INVALID_CONTENT if none)."""
    versions = history.versions(now)
    if not versions:
        raise content(f"no {kind}.SystemDescription received yet")
    found = [a for d in versions for a in d.actuators if sid(a.id) == sid(actuator_id)]
    if not found:
        raise content(f"unknown actuator {session.external_of(actuator_id)}")
    return found


def check_actuator_modes(found: list[Any], message: Any, session: SessionView) -> None:
    """The active and previous operation mode of an actuator status must be known."""
    modes = {sid(m.id) for a in found for m in a.operation_modes}
    for mode_id in (message.active_operation_mode_id, message.previous_operation_mode_id):
        if mode_id is not None and sid(mode_id) not in modes:
            raise content(f"unknown operation mode {session.external_of(mode_id)} of "
                          f"actuator {session.external_of(message.actuator_id)}")


def check_actuator_timer(found: list[Any], message: Any, session: SessionView) -> None:
    """The timer of a timer status must be one of the actuator's."""
    if sid(message.timer_id) not in {sid(t.id) for a in found for t in a.timers}:
        raise content(f"unknown timer {session.external_of(message.timer_id)} of actuator "
                      f"{session.external_of(message.actuator_id)}")
