"""Sending a plan's instructions to the RMs without churn, and superseding what it replaces.

The dispatcher remembers every instruction it sent. For a new plan, per RM:

- an instruction that starts now and equals the one already in force (same actuator, mode,
  factor...) is not sent again;
- a future instruction identical to one already pending (same content and execution time) is
  kept as it is;
- a pending future instruction the new plan does not contain any more is revoked with a
  RevokeObject before the new ones go out (only if it has not started: an instruction whose
  execution time passed, or that the RM reported STARTED/SUCCEEDED, is left alone).

Break before make: RMs whose instruction for now lowers their power get it before those it
raises (which wait until the RMs report the cuts started, at most BREAK_WAIT_S). A future
instruction that raises an RM's power is not sent ahead: it is held, and the control loop
sends it when its time comes (`due_raises`) if nothing changed meanwhile, after the cuts due
then have started; otherwise the next plan decides. So a raise of an older plan never fires
at a PTU boundary while a newer plan is being made, nor after the CEM is gone; cuts are sent
ahead and happen on time either way (an instruction's power is read from the RM's state by
its control type's plug-in, FRBC's from the system description; instructions whose power is
not known are sent ahead in their order).

RMs are served in parallel (within those two groups), the messages of one RM in order. A
message the RM does not accept (ReceptionStatus other than OK, or no answer) is reported
back, not retried here.

Only where they change: a replan may hand each RM a key of what its instructions are made of
(`cem.flex.site_problem.instruction_keys`). After a dispatch in which the RM took everything,
its key is kept; while the next plan gives it the same key (`unchanged`) its instructions are
neither built nor sent again. Anything else that sends to the RM (the guard's cap, held raises
released) or that makes what it was sent void (a new system description, a disconnect, a
refused or aborted instruction) drops the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from s2python.common import InstructionStatus, RevokableObjects, RevokeObject
from s2python.frbc import FRBCInstruction

from cem.flex.ptu import new_uuid, sid, uuid_int
from cem.ports import RmRegistry

logger = logging.getLogger("cem.control")

DONE_STATUSES = {"STARTED", "SUCCEEDED", "REJECTED", "ABORTED", "REVOKED"}
# what was sent does not stand (the names, and s2-python's members: an enum's `value` is slow)
VOID_STATUSES = frozenset({"REJECTED", "ABORTED", "REVOKED", InstructionStatus.REJECTED,
                           InstructionStatus.ABORTED, InstructionStatus.REVOKED})
# raises for now wait at most this long (wall seconds) for the cuts due with them to start
BREAK_WAIT_S = 0.5


def channel(message: Any) -> str:
    """What one instruction steers: an actuator, a PPBC container, or the whole RM."""
    for attr in ("actuator_id", "sequence_container_id"):
        value = getattr(message, attr, None)
        if value is not None:
            return f"{message.message_type}:{sid(value)}"
    return message.message_type


def content_key(message: Any, *, with_time: bool) -> Hashable:
    """The instruction's meaning: without its ids (and optionally its time).

    An FRBC.Instruction (nearly every instruction a site sends) is read from its fields; any
    other message from its JSON (a pydantic dump, ~30 us: a 5000-RM dispatch compares ~10k)."""
    if type(message) is FRBCInstruction:
        return ("FRBC.Instruction", uuid_int(message.actuator_id),
                uuid_int(message.operation_mode),
                float(message.operation_mode_factor), bool(message.abnormal_condition),
                message.execution_time if with_time else None)
    data = message.to_json_dict()
    for name in ("message_id", "id"):
        data.pop(name, None)
    if not with_time:
        data.pop("execution_time", None)
    for envelope in data.get("power_envelopes", []) or []:
        envelope.pop("id", None)
    return repr(sorted(data.items()))


@dataclass
class SentInstruction:
    rm_id: str
    message: Any
    execution_time: datetime
    plan_id: int | None = None
    revoked: bool = False
    # when the RM starts it: its execution time, but one whose time had passed when it was
    # sent starts on receipt, after what was in force then (which may have started later
    # than the dispatch's `now`, see Dispatcher.in_force)
    starts_at: datetime | None = None
    seq: int = 0  # send order: of two starting at once, the later one is in force
    message_sid: str = ""  # the message id as the RM's state knows it (made once)
    channel: str = ""  # what it steers (`channel`, made once: in_force asks on every dispatch)

    def __post_init__(self) -> None:
        if not self.message_sid:
            self.message_sid = sid(self.message.id)
        if not self.channel:
            self.channel = channel(self.message)

    @property
    def order(self) -> tuple[datetime, int]:
        return (self.starts_at or self.execution_time, self.seq)


@dataclass
class DispatchReport:
    """What one dispatch did, for the log line."""

    sent: int = 0
    kept: int = 0
    revoked: int = 0
    rms: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)  # plain-words, one per refused message
    failed_rms: set[str] = field(default_factory=set)
    unchanged_rms: int = 0  # RMs whose instructions were not even built (the same key)

    def describe(self) -> str:
        text = f"{self.sent} instruction(s) to {len(self.rms)} RM(s)"
        if self.kept:
            text += f", {self.kept} unchanged"
        if self.unchanged_rms:
            text += f", {self.unchanged_rms} RM(s) as before"
        if self.revoked:
            text += f", {self.revoked} revoked"
        if self.failed:
            text += f", {len(self.failed)} refused"
        return text


class Dispatcher:
    """Keeps the instructions sent to each RM and turns a new set into sends and revokes."""

    def __init__(self, registry: RmRegistry, clock: Callable[[], datetime] | None = None) -> None:
        self.registry = registry
        # the time at sending, when the caller's `now` may be old (a replan passes the time
        # it began at, before its solve): None trusts `now`
        self.clock = clock
        self.sent: dict[str, list[SentInstruction]] = {}
        # per RM: the instructions of its last dispatch, and when those held back (future
        # raises, not sent ahead) are due
        self.planned: dict[str, list[Any]] = {}
        self.held: dict[str, list[datetime]] = {}
        # per RM: the key of what its last dispatch was made of, while it took all of it, and
        # that key once the RM has carried out what was due (`site_problem.settled_keys`)
        self.keys: dict[str, Hashable] = {}
        self.settled: dict[str, Hashable] = {}
        # per RM: the state and its `statuses_version` when `unchanged` last found none of
        # its kept instructions refused, aborted or revoked
        self._statuses_seen: dict[str, tuple[Any, int]] = {}
        self._seq = 0

    def forget(self, rm_id: str) -> None:
        """The RM is gone (its session and instructions with it)."""
        self.sent.pop(rm_id, None)
        self.planned.pop(rm_id, None)
        self.held.pop(rm_id, None)
        self.forget_key(rm_id)

    def forget_key(self, rm_id: str) -> None:
        """What the RM was sent no longer stands as sent (it refused or aborted an
        instruction): the next plan builds and dispatches its instructions again."""
        self.keys.pop(rm_id, None)
        self.settled.pop(rm_id, None)
        self._statuses_seen.pop(rm_id, None)

    def unchanged(self, rm_id: str, key: Hashable | None) -> bool:
        """Whether the RM's last dispatch was made of `key` and still stands: it took all of
        it and refused, aborted or revoked none of it since (or `key` is that key once the RM
        carried out what was due: it took the instructions for now)."""
        if key is None or (self.keys.get(rm_id) != key and self.settled.get(rm_id) != key):
            return False
        entry = self.registry.get(rm_id)
        return entry is not None and self._stands(rm_id, entry.state)

    def unchanged_among(self, keys: Mapping[str, Hashable | None],
                        live: Collection[str]) -> set[str]:
        """The RMs of `keys` in `live` that are `unchanged` with their key (5000 a replan:
        an RM that reported no instruction status since they were last read is not read
        again, `_stands`)."""
        unchanged = self.unchanged
        return {rm_id for rm_id, key in keys.items() if rm_id in live and unchanged(rm_id, key)}

    def _stands(self, rm_id: str, state: Any) -> bool:
        """Whether none of the RM's kept instructions was refused, aborted or revoked (else
        its key is dropped); not read again while the state reports no new status."""
        version = getattr(state, "statuses_version", None)  # (a stand-in state may lack it)
        seen = self._statuses_seen.get(rm_id)
        if seen is not None and seen[0] is state and seen[1] == version:
            return True  # no status reported since they were read: 5000 RMs a replan
        status_of = state.instruction_status  # (read once)
        for s in self.sent.get(rm_id, ()):
            if s.revoked:
                continue
            status = status_of(s.message_sid)
            if status is None:
                continue
            if not isinstance(status, str):  # (s2-python's are str enums, in the set as such)
                status = getattr(status, "value", status)
            if status in VOID_STATUSES:
                self.forget_key(rm_id)
                return False
        if version is not None:
            self._statuses_seen[rm_id] = (state, version)
        return True

    def due_raises(self, now: datetime) -> dict[str, list[Any]]:
        """Per RM with a held raise due by `now`: its last dispatch's instructions, to dispatch
        again (what is in force or pending is kept, the raise goes out)."""
        return {rm: list(self.planned.get(rm, [])) for rm, times in self.held.items()
                if any(t <= now for t in times)}

    async def until_started(self, now: datetime) -> None:
        """Wait (at most BREAK_WAIT_S) until every instruction sent for `now` or before has
        started at its RM: at a PTU boundary the cuts sent ahead go first."""
        await self._until_started([(rm, s) for rm, sent in self.sent.items() for s in sent
                                   if not s.revoked and s.execution_time <= now])

    def forget_in_force(self, rm_id: str, now: datetime) -> None:
        """The RM described itself afresh: what was in force may no longer hold (an EV charger
        that idled without an EV runs on its default profile once one arrives), so the next plan
        sends the instruction for now again instead of keeping it as unchanged."""
        self.sent[rm_id] = [s for s in self.sent.get(rm_id, []) if s.execution_time > now]
        self.forget_key(rm_id)

    def _status(self, rm_id: str, instruction: SentInstruction) -> str | None:
        entry = self.registry.get(rm_id)
        if entry is None:
            return None
        status = entry.state.instruction_status(instruction.message_sid)
        return getattr(status, "value", status)  # an InstructionStatus, or its value

    def pending(self, rm_id: str, now: datetime) -> list[SentInstruction]:
        """Sent, not revoked, not started and still in the future."""
        return [s for s in self.sent.get(rm_id, [])
                if not s.revoked and s.execution_time > now
                and self._status(rm_id, s) not in DONE_STATUSES]

    def in_force(self, rm_id: str, now: datetime) -> dict[str, SentInstruction]:
        """Per channel, the last instruction whose time has come and that was not refused.

        One the RM reports STARTED or SUCCEEDED has come, whatever `now` says: a replan
        dispatches with the time it began at, and an instruction of the previous plan may
        have started while it solved (a PTU boundary passed). Taking that one for pending
        would neither revoke it (it runs) nor count it in force: the new plan's instruction
        for now would look unchanged and stay unsent while the RM carries out the old one.
        """
        current: dict[str, SentInstruction] = {}
        for s in self.sent.get(rm_id, []):
            if s.revoked:
                continue
            status = self._status(rm_id, s)
            if s.execution_time > now and status not in ("STARTED", "SUCCEEDED"):
                continue
            if status in VOID_STATUSES:
                continue
            previous = current.get(s.channel)
            if previous is None or previous.order <= s.order:
                current[s.channel] = s
        return current

    async def dispatch(self, instructions: dict[str, list[Any]], now: datetime, *,
                       plan_id: int | None = None, replace_all_of: set[str] | None = None,
                       keys: Mapping[str, Hashable | None] | None = None,
                       settled: Mapping[str, Hashable] | None = None) -> DispatchReport:
        """Bring every RM in `instructions` (and `replace_all_of`) to the new set.

        `keys`: per RM, what its instructions were made of, kept for `unchanged` when the RM
        takes them all (an RM dispatched without a key loses the one it had); `settled`: the
        same once the RM has carried out what was due, kept with it.

        With a clock, what is due is judged at the time of sending: of the instructions of
        one channel whose time has come by then only the last is sent (the earlier ones
        would run for a moment and be replaced at once: a plan that outlasted a PTU boundary
        would switch an EV on for its first PTU and off for the second in the same breath).
        """
        report = DispatchReport()
        rms = set(instructions) | (replace_all_of or set())
        for rm in rms:
            self.forget_key(rm)
        instructions = {rm: list(instructions.get(rm, [])) for rm in rms}  # the caller's stay
        for rm in rms:
            self.planned[rm] = list(instructions[rm])
        if self.clock is not None:
            now = max(now, self.clock())
            instructions = {rm: _last_due(msgs, now) for rm, msgs in instructions.items()}
        # RMs that go up wait until those that go down have theirs: sent together, an EV
        # turned up could draw before another one is turned down, above the fuse for the
        # moment in between (a plan moving power from one EV to another, a guard's cap)
        rising: set[str] = set()
        for number, rm in enumerate(rms, start=1):
            in_force = self.in_force(rm, now)  # once per RM: both judgements below read it
            power = _Powers(self, rm, now)  # each message's power once: both ask for them
            instructions[rm], self.held[rm] = self._hold_raises(
                rm, instructions.get(rm, []), now, in_force, power)
            if not self.held[rm]:
                del self.held[rm]
            if self._rises(rm, instructions.get(rm, []), now, in_force, power):
                rising.add(rm)
            if number % DECIDE_PACE == 0:  # 1000 RMs take ~0.2 s: S2 sessions get turns
                await asyncio.sleep(0)
        first_seq = self._seq
        await _paced(self._dispatch_rm(rm, instructions.get(rm, []), now, plan_id, report)
                     for rm in sorted(rms - rising))
        if rising:
            # an RM acknowledges an instruction before it carries it out: the raises wait
            # until the cuts have started (a few ms; at most BREAK_WAIT_S)
            cuts = [(rm, s) for rm in rms - rising for s in self.sent.get(rm, [])
                    if s.seq > first_seq and s.execution_time <= now]
            await self._until_started(cuts)
            await _paced(self._dispatch_rm(rm, instructions.get(rm, []), now, plan_id, report)
                         for rm in sorted(rising))
        for rm in rms - report.failed_rms:
            key = keys.get(rm) if keys is not None else None
            if key is not None:
                self.keys[rm] = key
                after = settled.get(rm) if settled is not None else None
                if after is not None and after != key:
                    self.settled[rm] = after
        return report

    async def _until_started(self, sent: list[tuple[str, SentInstruction]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BREAK_WAIT_S
        while sent and loop.time() < deadline:
            sent = [(rm, s) for rm, s in sent if self._status(rm, s) not in DONE_STATUSES]
            if sent:
                await asyncio.sleep(0.005)

    def _hold_raises(self, rm_id: str, messages: list[Any], now: datetime,
                     in_force: dict[str, SentInstruction],
                     power_of: Callable[[Any], float | None] | None = None,
                     ) -> tuple[list[Any], list[datetime]]:
        """The messages to send now, and the times of the future raises held back.

        A future instruction is a raise when it asks for more power than the RM would run
        at by what is sent: a held raise leaves the power where it was, so what follows it
        is judged against that, and never goes up ahead of the control loop either."""
        power_of = power_of or _Powers(self, rm_id, now)
        out: list[Any] = []
        held: list[datetime] = []
        previous: dict[str, float | None] = {}
        for message in sorted(messages, key=lambda m: m.execution_time):
            power = power_of(message)
            key = channel(message)
            if key not in previous:
                current = in_force.get(key)
                previous[key] = power_of(current.message) if current is not None else 0.0
            before = previous[key]
            if message.execution_time > now and power is not None and before is not None \
                    and power > before + 1.0:
                held.append(message.execution_time)
                continue
            previous[key] = power
            out.append(message)
        return out, held

    def _rises(self, rm_id: str, messages: list[Any], now: datetime,
               in_force: dict[str, SentInstruction],
               power_of: Callable[[Any], float | None] | None = None) -> bool:
        """Whether the RM's instructions for now ask for more power than the one in force."""
        due = [m for m in messages if m.execution_time <= now]
        if not due:
            return False
        power_of = power_of or _Powers(self, rm_id, now)
        new = due[-1]
        current = in_force.get(channel(new))
        new_w = power_of(new)
        old_w = power_of(current.message) if current is not None else 0.0
        return new_w is not None and old_w is not None and new_w > old_w + 1.0

    def _power_w(self, rm_id: str, message: Any, now: datetime) -> float | None:
        """The electric power an instruction asks for, as its control type's plug-in reads it
        from the RM's state (None: not known here)."""
        entry = self.registry.get(rm_id)
        if entry is None:
            return None
        plugin = entry.state.plugin
        if plugin is None or getattr(message, "message_type", "") not in plugin.instruction_types:
            return None
        try:
            power: float | None = plugin.instruction_power_w(
                entry.state.of(plugin.control_type), message, now)
        except Exception:  # an odd description: no ordering, not a failed dispatch
            return None
        return power

    async def _dispatch_rm(self, rm_id: str, messages: list[Any], now: datetime,
                           plan_id: int | None, report: DispatchReport) -> None:
        pending = self.pending(rm_id, now)
        in_force = self.in_force(rm_id, now)
        keep: set[int] = set()
        to_send: list[Any] = []
        pending_keys = {content_key(p.message, with_time=True): i for i, p in enumerate(pending)}
        for message in messages:
            when = message.execution_time
            if when <= now:
                current = in_force.get(channel(message))
                if current is not None and content_key(current.message, with_time=False) == \
                        content_key(message, with_time=False):
                    report.kept += 1
                    continue
            else:
                index = pending_keys.get(content_key(message, with_time=True))
                if index is not None and index not in keep:
                    keep.add(index)
                    report.kept += 1
                    continue
            to_send.append(message)
        for index, old in enumerate(pending):
            if index in keep:
                continue
            revoke = RevokeObject(message_id=new_uuid(),
                                  object_type=RevokableObjects(old.message.message_type),
                                  object_id=old.message.id)
            result = await self.registry.send_instruction(rm_id, revoke)
            old.revoked = True  # even if refused: it is no longer part of the plan
            if result.ok:
                report.revoked += 1
            else:
                report.failed_rms.add(rm_id)
                report.failed.append(f"RM {rm_id} refused revoking {old.message.message_type}: "
                                     f"{result.describe()}")
        for message in to_send:
            result = await self.registry.send_instruction(rm_id, message, plan_id=plan_id)
            if result.ok:
                report.sent += 1
                report.rms.add(rm_id)
                starts_at = message.execution_time
                current = in_force.get(channel(message))
                if starts_at <= now and current is not None:
                    starts_at = max(starts_at, current.order[0])
                self._seq += 1
                self.sent.setdefault(rm_id, []).append(
                    SentInstruction(rm_id, message, message.execution_time, plan_id,
                                    starts_at=starts_at, seq=self._seq))
            else:
                report.failed_rms.add(rm_id)
                report.failed.append(f"RM {rm_id} refused {message.message_type}: "
                                     f"{result.describe()}")
        if to_send or len(keep) < len(pending):
            # (an RM that kept everything has nothing new to prune: its next dispatch that
            # sends does, and in_force reads the latest of a channel whatever is kept)
            self._prune(rm_id, now)

    def _prune(self, rm_id: str, now: datetime) -> None:
        """Keep only what may still matter: pending ones and the latest in force per channel."""
        keep_ids = {id(s) for s in self.pending(rm_id, now)}
        keep_ids |= {id(s) for s in self.in_force(rm_id, now).values()}
        self.sent[rm_id] = [s for s in self.sent.get(rm_id, []) if id(s) in keep_ids]


class _Powers:
    """`Dispatcher._power_w` of one RM's messages at one moment, each message asked once."""

    def __init__(self, dispatcher: Dispatcher, rm_id: str, now: datetime) -> None:
        self.dispatcher, self.rm_id, self.now = dispatcher, rm_id, now
        self.known: dict[int, tuple[Any, float | None]] = {}  # id -> (message, power)

    def __call__(self, message: Any) -> float | None:
        known = self.known.get(id(message))
        if known is not None and known[0] is message:
            return known[1]
        power = self.dispatcher._power_w(self.rm_id, message, self.now)
        self.known[id(message)] = (message, power)
        return power


def _last_due(messages: list[Any], now: datetime) -> list[Any]:
    """The messages without those a later one of the same channel replaces by `now`."""
    last: dict[str, Any] = {}
    for message in messages:
        if message.execution_time <= now:
            held = last.get(channel(message))
            if held is None or held.execution_time <= message.execution_time:
                last[channel(message)] = message
    return [m for m in messages
            if m.execution_time > now or last.get(channel(m)) is m]


PACE = 64  # RMs whose sending starts per turn of the event loop
DECIDE_PACE = 16  # RMs whose raises are judged per turn of the event loop (~3 ms)


async def _paced(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run the per-RM sends concurrently, started PACE at a time with a turn of the loop between.

    Started all at once, 1000 RMs' first steps (building and serialising their instructions)
    run in one turn of the loop and hold every other S2 session back for ~100 ms.
    """
    tasks: list[asyncio.Task[None]] = []
    for number, coro in enumerate(coros, start=1):
        tasks.append(asyncio.ensure_future(coro))
        if number % PACE == 0:
            await asyncio.sleep(0)
    if tasks:
        await asyncio.gather(*tasks)
