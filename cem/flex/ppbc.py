"""PPBC (power profile based control) -> ShiftableProfile; a planned start -> ScheduleInstructions.

A PowerProfileDefinition is a chain of sequence containers, each with alternative power
sequences; it must run between `start_time` and `end_time`. We plan it as one contiguous
profile: containers in their order, back to back (no pause is always allowed), averaged per
PTU. Each chain of one normal sequence per container (never `abnormal_condition_only` ones) is
one shape of the ShiftableProfile with its own start window (a longer chain must start earlier
to finish by `end_time`); a chain that cannot finish in time is never offered. The planner picks
the shape and start (cheapest within the site limits); the RM's preferred sequences (listed
first) make option 0. Up to MAX_CHAINS chains: all combinations, or else the preferred chain
and each single swap. Once its start is due, the chosen chain becomes one
PPBC.ScheduleInstruction per container at its offset, all containers at once.

Running profiles: once a container is EXECUTING the rest is no longer shiftable and becomes a
FixedLoad from now; an interruptible sequence the guard interrupted (INTERRUPTED) is planned
again as shiftable and resumed with a PPBC.EndInterruptionInstruction. The guard may pause an
executing interruptible sequence with a PPBC.StartInterruptionInstruction.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from s2python.ppbc import (
    PPBCEndInterruptionInstruction,
    PPBCPowerProfileDefinition,
    PPBCPowerProfileStatus,
    PPBCPowerSequence,
    PPBCScheduleInstruction,
    PPBCStartInterruptionInstruction,
)

from cem.flex.ptu import (
    PtuGrid,
    as_uuid,
    electric_total,
    is_electric,
    new_uuid,
    phase_share,
    sample_rate,
    sid,
)
from cem.planner.assets import (
    FixedLoad,
    PhaseShare,
    Plan,
    Problem,
    ProfileOption,
    ShiftableProfile,
)

CONTROL_TYPE = "POWER_PROFILE_BASED_CONTROL"
DONE = {"FINISHED", "ABORTED"}
RUNNING = {"EXECUTING"}
MAX_CHAINS = 24  # sequence chains per profile the planner chooses from


@dataclass
class Step:
    """One container of the planned chain: which sequence and when it starts in the profile."""

    container_id: str
    sequence: PPBCPowerSequence
    offset: timedelta
    resume: bool = False  # INTERRUPTED: resume with EndInterruption instead of scheduling


def sequence_duration(sequence: PPBCPowerSequence) -> timedelta:
    return timedelta(milliseconds=sum(e.duration.root for e in sequence.elements))


def chain_power(grid: PtuGrid, start: datetime, sequences: list[PPBCPowerSequence],
                skip: timedelta = timedelta(0)) -> np.ndarray:
    """Average power per PTU of sequences run back to back from `start` (minus `skip`)."""
    durations, values = [], []
    for sequence in sequences:
        for element in sequence.elements:
            durations.append(element.duration.root)
            values.append(electric_total(element.power_values, "value_expected") or 0.0)
    average, coverage = sample_rate(grid, start - skip, durations, values)
    return average * coverage


def _progress(progress: object) -> timedelta:
    """How far an executing sequence is (s2-python 0.11 types `progress` wrongly: 0 then)."""
    millis = getattr(progress, "root", progress)
    return timedelta(milliseconds=millis) if isinstance(millis, int | float) else timedelta(0)


@dataclass
class PpbcBinding:
    """Ties a ShiftableProfile to its PowerProfileDefinition; schedules the planned start."""

    rm_id: str
    asset_id: str
    profile_id: str
    steps: list[Step]  # the chain of the asset's option 0
    options: list[list[Step]] = field(default_factory=list)  # per ProfileOption: its chain
    executing: tuple[str, str, bool] | None = None  # (container, sequence, interruptible)
    priority: int = 1
    phase_share: PhaseShare = (1 / 3, 1 / 3, 1 / 3)
    control_type: str = CONTROL_TYPE
    peak_w: float = 0.0
    notes: list[str] = field(default_factory=list)

    def instructions(self, plan: Plan, problem: Problem, now: datetime,
                     until_ptu: int) -> list:
        """Schedule (or resume) every container of the chain the plan chose once its first
        container starts before `until_ptu`.

        The whole chain at once: once a container runs the rest is no longer planned (it is a
        FixedLoad then), so a later container left for a later dispatch would never be sent.
        """
        start_ptu = plan.profile_start.get(self.asset_id)
        choice = plan.profile_choice.get(self.asset_id, 0)
        steps = self.options[choice] if 0 <= choice < len(self.options) else self.steps
        if start_ptu is None or not steps:
            return []
        begin = max(now, problem.ptu_start(start_ptu))
        if max(now, begin + steps[0].offset) >= problem.ptu_start(until_ptu):
            return []  # not due yet: a later plan schedules it
        out: list = []
        for step in steps:
            when = max(now, begin + step.offset)
            kind = PPBCEndInterruptionInstruction if step.resume else PPBCScheduleInstruction
            out.append(kind(message_id=new_uuid(), id=new_uuid(),
                            power_profile_id=as_uuid(self.profile_id),
                            sequence_container_id=as_uuid(step.container_id),
                            power_sequence_id=as_uuid(step.sequence.id), execution_time=when,
                            abnormal_condition=False))
        return out

    def capped_instructions(self, cap_w: float, now: datetime) -> list | None:
        """Pause an executing interruptible sequence when the cap is below its power."""
        if self.executing is None or not self.executing[2] or cap_w >= self.peak_w:
            return None
        container, sequence, _ = self.executing
        return [PPBCStartInterruptionInstruction(
            message_id=new_uuid(), id=new_uuid(), power_profile_id=as_uuid(self.profile_id),
            sequence_container_id=as_uuid(container), power_sequence_id=as_uuid(sequence),
            execution_time=now, abnormal_condition=False)]

    def can_cap(self) -> bool:
        """Only while an interruptible sequence runs (it can be paused)."""
        return self.executing is not None and self.executing[2]

    def power_range_w(self) -> tuple[float, float]:
        return (0.0, self.peak_w)


def _chains(choices: list[list[PPBCPowerSequence]]) -> tuple[list[list[PPBCPowerSequence]], bool]:
    """The sequence chains the planner may choose from, the RM's preferred one first.

    Every combination of the containers' alternatives while there are at most MAX_CHAINS;
    beyond that the preferred chain and each single swap of one container's sequence (True:
    cut down so).
    """
    count = math.prod(len(c) for c in choices)
    if count <= MAX_CHAINS:
        return [list(chain) for chain in itertools.product(*choices)], False
    preferred = [c[0] for c in choices]
    out = [preferred]
    for i, alternatives in enumerate(choices):
        for sequence in alternatives[1:]:
            out.append([*preferred[:i], sequence, *preferred[i + 1:]])
    return out[:MAX_CHAINS], True


def ppbc_assets(rm_id: str, definition: PPBCPowerProfileDefinition, grid: PtuGrid,
                now: datetime, *, status: PPBCPowerProfileStatus | None = None,
                priority: int = 1) -> tuple[ShiftableProfile | FixedLoad | None, PpbcBinding]:
    """The planner's view of one power profile definition, and its binding."""
    states = {}
    if status is not None:
        for s in status.sequence_container_status:
            if sid(s.power_profile_id) == sid(definition.id):
                states[sid(s.sequence_container_id)] = s
    asset_id = f"{rm_id}/{sid(definition.id)}"
    pairs = [(v.commodity_quantity, v.value_expected)
             for c in definition.power_sequences_containers for s in c.power_sequences
             for e in s.elements for v in e.power_values if is_electric(v.commodity_quantity)]
    share = phase_share(pairs)
    binding = PpbcBinding(rm_id=rm_id, asset_id=asset_id, profile_id=sid(definition.id),
                          steps=[], priority=priority, phase_share=share)

    remaining: list[PPBCPowerSequence] = []
    containers: list[tuple[str, list[PPBCPowerSequence], bool]] = []  # id, choices, resume
    running_skip: timedelta | None = None
    for container in definition.power_sequences_containers:
        state = states.get(sid(container.id))
        value = state.status.value if state is not None else "NOT_SCHEDULED"
        if value in DONE:
            continue
        by_id = {sid(s.id): s for s in container.power_sequences}
        selected = by_id.get(sid(state.selected_sequence_id)) if (
            state is not None and state.selected_sequence_id is not None) else None
        if value in RUNNING and selected is not None and state is not None:
            running_skip = _progress(state.progress)
            binding.executing = (sid(container.id), sid(selected.id), selected.is_interruptible)
            remaining.append(selected)
            continue
        if value == "INTERRUPTED" and selected is not None:
            choices = [selected]  # resumed as it was selected: no other choice
        else:
            choices = [s for s in container.power_sequences if not s.abnormal_condition_only]
        if not choices:
            binding.notes.append(f"{rm_id}: container {container.id} has only abnormal sequences")
            continue
        if running_skip is not None:  # after the running one: as scheduled, else preferred
            remaining.append(selected if selected is not None else choices[0])
            continue
        containers.append((sid(container.id), choices, value == "INTERRUPTED"))

    if running_skip is not None:
        power = chain_power(grid, now, remaining, running_skip)
        binding.peak_w = float(power.max(initial=0.0))
        return FixedLoad(id=asset_id, power_w=np.round(power).astype(np.int64),
                         phase_share=share), binding
    if not containers:
        return None, binding

    chains, cut = _chains([choices for _id, choices, _resume in containers])
    if cut:
        binding.notes.append(f"{rm_id}: profile {definition.id} has too many sequence "
                             f"combinations; planned with {len(chains)} of them")
    options: list[tuple[list[Step], ProfileOption]] = []
    for chain in chains:
        steps, offset = [], timedelta(0)
        for (container_id, _choices, resume), sequence in zip(containers, chain, strict=True):
            steps.append(Step(container_id, sequence, offset, resume=resume))
            offset += sequence_duration(sequence)
        n_profile = max(1, math.ceil(offset.total_seconds() / grid.ptu_s - 1e-9))
        profile = chain_power(PtuGrid(grid.start, grid.ptu_minutes, n_profile), grid.start, chain)
        earliest = max(0, grid.index_ceil(definition.start_time))
        latest = min(grid.index_floor(definition.end_time - offset), grid.n_ptus - n_profile)
        options.append((steps, ProfileOption(np.round(profile).astype(np.int64), earliest, latest)))
    feasible = [o for o in options if o[1].latest_start >= o[1].earliest_start]
    if not feasible:  # nothing fits: the RM's preferred chain, as early as it may start
        binding.notes.append(f"{rm_id}: profile {definition.id} cannot finish by its end time; "
                             "planned at its earliest start")
        steps, option = options[0]
        option.latest_start = option.earliest_start
        feasible = [(steps, option)]
    binding.options = [steps for steps, _option in feasible]
    binding.steps = binding.options[0]
    binding.peak_w = max(float(o.profile_w.max(initial=0)) for _steps, o in feasible)
    first = feasible[0][1]
    asset = ShiftableProfile(id=asset_id, profile_w=first.profile_w,
                             earliest_start=first.earliest_start, latest_start=first.latest_start,
                             phase_share=share, alternatives=[o for _steps, o in feasible[1:]])
    return asset, binding
