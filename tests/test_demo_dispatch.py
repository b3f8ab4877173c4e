"""The dispatcher when a replan's solve outlasts a PTU boundary, as it does in `cem demo`.

At 1440x a 0.1 s solve is 2.4 simulated minutes: the previous plan's instruction for the next
PTU may start while the new plan is solved, and the new plan is dispatched with the time its
replan began at. The new plan's instruction for "now" must still go out.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cem.control.dispatch import Dispatcher
from cem.flex.frbc import frbc_instruction
from cem.ports import InstructionResult

T0 = datetime(2019, 10, 8, 10, 0, tzinfo=UTC)
ACTUATOR, CHARGING, IDLE = (str(uuid.uuid4()) for _ in range(3))


@dataclass
class _State:
    status: dict[str, str] = field(default_factory=dict)
    plugin: Any = None  # no control type: instructions' power unknown

    def instruction_status(self, instruction_id: str) -> str | None:
        return self.status.get(instruction_id)


@dataclass
class _Entry:
    state: _State


class _Registry:
    def __init__(self) -> None:
        self.entry = _Entry(_State())
        self.sent: list[Any] = []

    def get(self, rm_id: str) -> _Entry:
        return self.entry

    async def send_instruction(self, rm_id: str, message: Any, **_: Any) -> InstructionResult:
        self.sent.append(message)
        return InstructionResult(rm_id, str(message.message_id), "OK")


async def test_an_instruction_that_started_during_the_solve_counts_as_in_force() -> None:
    registry = _Registry()
    dispatcher = Dispatcher(registry)
    idle_now = frbc_instruction(ACTUATOR, IDLE, 0.0, T0)
    charge_next = frbc_instruction(ACTUATOR, CHARGING, 1.0, T0 + timedelta(minutes=15))
    await dispatcher.dispatch({"ev": [idle_now, charge_next]}, T0)
    assert len(registry.sent) == 2
    # the PTU boundary passes and the EV charges at full power ...
    registry.entry.state.status[str(idle_now.id)] = "SUCCEEDED"
    registry.entry.state.status[str(charge_next.id)] = "STARTED"
    # ... while the next plan, begun at 10:14, solves: it wants the EV idle from now on
    began = T0 + timedelta(minutes=14)
    assert str(charge_next.id) in {str(s.message.id) for s in
                                   dispatcher.in_force("ev", began).values()}
    registry.sent.clear()
    report = await dispatcher.dispatch({"ev": [frbc_instruction(ACTUATOR, IDLE, 0.0, began)]},
                                       began)
    assert report.sent == 1 and report.kept == 0 and report.revoked == 0
    assert [str(m.operation_mode) for m in registry.sent] == [IDLE]
    # and the fast guard right after knows the EV is idle now (nothing to send again)
    registry.entry.state.status[str(registry.sent[0].id)] = "SUCCEEDED"
    registry.sent.clear()
    later = T0 + timedelta(minutes=16)
    report = await dispatcher.dispatch({"ev": [frbc_instruction(ACTUATOR, IDLE, 0.0, later)]},
                                       later)
    assert report.sent == 0 and report.kept == 1


class _EvState(_State):
    """An FRBC RM's state: the FRBC plug-in reads the instructions' power from it."""

    def __init__(self, description: Any) -> None:
        from cem.control_types.frbc import PLUGIN

        super().__init__()
        self.description = description
        self.storage_status = None
        self.plugin = PLUGIN

    def of(self, control_type: Any) -> Any:
        return self

    def system_description(self, now: datetime) -> Any:
        return self.description


class _TwoEvs(_Registry):
    def __init__(self) -> None:
        from resource_managers.ocpp_charger import frbc

        super().__init__()
        flex = frbc.EvseFlex(name="x", online=True, has_session=True, phases=3, phase="L1",
                             min_current_a=6, max_current_a=16)
        self.ids = {rm: frbc.FrbcIds.for_resource(uuid.uuid4()) for rm in ("a", "b")}
        self.entries = {rm: _Entry(_EvState(frbc.system_description(flex, ids, T0)))
                        for rm, ids in self.ids.items()}
        self.order: list[str] = []

    def get(self, rm_id: str) -> _Entry:
        return self.entries[rm_id]

    async def send_instruction(self, rm_id: str, message: Any, **_: Any) -> InstructionResult:
        self.order.append(rm_id)
        if self.carry_out:  # the RM starts it a moment after its ReceptionStatus
            asyncio.get_running_loop().call_later(
                0.02, self.entries[rm_id].state.status.__setitem__, str(message.id), "STARTED")
        return InstructionResult(rm_id, str(message.message_id), "OK")

    carry_out = True

    def charge(self, rm: str, factor: float, at: datetime) -> Any:
        return frbc_instruction(self.ids[rm].actuator, self.ids[rm].charging, factor, at)

    def idle(self, rm: str, at: datetime) -> Any:
        return frbc_instruction(self.ids[rm].actuator, self.ids[rm].idle, 0.0, at)


async def test_power_moves_from_one_ev_to_another_down_first() -> None:
    registry = _TwoEvs()
    dispatcher = Dispatcher(registry)
    await dispatcher.dispatch({"a": [registry.idle("a", T0)],
                               "b": [registry.charge("b", 1.0, T0)]}, T0)
    assert sorted(registry.order) == ["a", "b"]
    registry.order.clear()
    later = T0 + timedelta(minutes=5)
    # the plan gives b's 11 kW to a: b is turned down before a is turned up
    await dispatcher.dispatch({"a": [registry.charge("a", 1.0, later)],
                               "b": [registry.idle("b", later)]}, later)
    assert registry.order == ["b", "a"]
    registry.order.clear()
    # and back, partly: a down to its minimum first, then b up
    latest = later + timedelta(minutes=5)
    await dispatcher.dispatch({"a": [registry.charge("a", 0.0, latest)],
                               "b": [registry.charge("b", 0.5, latest)]}, latest)
    assert registry.order == ["a", "b"]


async def test_a_raise_waits_until_the_cut_has_started_at_most_break_wait() -> None:
    from cem.control.dispatch import BREAK_WAIT_S

    registry = _TwoEvs()
    dispatcher = Dispatcher(registry)
    await dispatcher.dispatch({"a": [registry.idle("a", T0)],
                               "b": [registry.charge("b", 1.0, T0)]}, T0)
    loop = asyncio.get_running_loop()
    later = T0 + timedelta(minutes=5)
    began = loop.time()
    await dispatcher.dispatch({"a": [registry.charge("a", 1.0, later)],
                               "b": [registry.idle("b", later)]}, later)
    assert 0.015 <= loop.time() - began < BREAK_WAIT_S  # waited for b's cut to start
    registry.carry_out = False  # an RM that never reports: the raise goes out anyway
    latest = later + timedelta(minutes=5)
    began = loop.time()
    await dispatcher.dispatch({"a": [registry.idle("a", latest)],
                               "b": [registry.charge("b", 1.0, latest)]}, latest)
    assert loop.time() - began >= BREAK_WAIT_S - 0.01


async def test_raises_are_held_for_their_boundary_and_cuts_are_sent_ahead() -> None:
    """A raise of a plan must not fire at a PTU boundary on its own (a newer plan may be
    solving, the CEM may be gone): it is held and sent when due; a cut goes out ahead."""
    registry = _TwoEvs()
    dispatcher = Dispatcher(registry)
    boundary = T0 + timedelta(minutes=15)
    sent: list[Any] = []

    async def record(rm_id: str, message: Any, **_: Any) -> InstructionResult:
        sent.append((rm_id, message))
        registry.entries[rm_id].state.status[str(message.id)] = \
            "STARTED" if message.execution_time <= now else "ACCEPTED"
        return InstructionResult(rm_id, str(message.message_id), "OK")

    registry.send_instruction = record  # type: ignore[method-assign]
    now = T0
    plan = {"a": [registry.idle("a", T0), registry.charge("a", 1.0, boundary)],
            "b": [registry.charge("b", 1.0, T0), registry.idle("b", boundary),
                  registry.charge("b", 0.5, boundary + timedelta(minutes=15))]}
    await dispatcher.dispatch(plan, T0)
    at = {(rm, str(m.operation_mode)): m.execution_time for rm, m in sent}
    assert at == {("a", registry.ids["a"].idle): T0, ("b", registry.ids["b"].charging): T0,
                  ("b", registry.ids["b"].idle): boundary}  # b's cut ahead, no raise
    assert dispatcher.due_raises(T0 + timedelta(minutes=14)) == {}
    # the same plan again changes nothing: kept, not revoked, raises still held
    sent.clear()
    report = await dispatcher.dispatch(plan, T0)
    assert report.sent == 0 and report.revoked == 0 and report.kept == 3 and not sent
    # at the boundary the loop sends a's raise (b's cut, sent ahead, has started); b's raise
    # of the PTU after stays held
    now = boundary
    registry.entries["b"].state.status[str(plan["b"][1].id)] = "STARTED"
    due = dispatcher.due_raises(boundary)
    assert set(due) == {"a"}
    report = await dispatcher.dispatch(due, boundary)
    assert [(rm, str(m.operation_mode)) for rm, m in sent] == [("a", registry.ids["a"].charging)]
    assert report.sent == 1 and report.revoked == 0
    assert dispatcher.due_raises(boundary) == {}
    assert set(dispatcher.due_raises(boundary + timedelta(minutes=15))) == {"b"}
    # a new plan replaces what was held: nothing of the old one is due any more
    await dispatcher.dispatch({"b": [registry.idle("b", boundary + timedelta(minutes=1))]},
                              boundary + timedelta(minutes=1))
    assert dispatcher.due_raises(boundary + timedelta(minutes=15)) == {}


async def test_with_a_clock_what_a_late_dispatch_would_replace_at_once_is_not_sent() -> None:
    registry = _TwoEvs()
    sent: list[Any] = []

    async def record(rm_id: str, message: Any, **_: Any) -> InstructionResult:
        sent.append(message)
        return InstructionResult(rm_id, str(message.message_id), "OK")

    registry.send_instruction = record  # type: ignore[method-assign]
    boundary = T0 + timedelta(minutes=15)
    actual = boundary + timedelta(minutes=2)  # the solve took minutes of simulated time
    plan = [registry.charge("a", 1.0, T0 + timedelta(minutes=10)), registry.idle("a", boundary),
            registry.charge("a", 0.5, boundary + timedelta(minutes=15))]
    await Dispatcher(registry, clock=lambda: actual).dispatch({"a": plan}, T0)
    # the idle one is due at the actual time; the charging one after it, a raise, is held
    assert [str(m.operation_mode) for m in sent] == [registry.ids["a"].idle]
    sent.clear()
    await Dispatcher(registry).dispatch({"a": plan}, T0)  # no clock: as told, at 10:00
    # both charging instructions are future raises (held); the idle one goes ahead
    assert [str(m.operation_mode) for m in sent] == [registry.ids["a"].idle]
