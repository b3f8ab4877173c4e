"""Property tests: every plan of a random small site keeps every hard limit and EV rule."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cem.planner.assets import (
    THREE_PHASE,
    Curtailable,
    FixedLoad,
    ModeAsset,
    PowerMode,
    Prices,
    Problem,
    ProfileOption,
    ShiftableProfile,
    SiteLimits,
    StorageAsset,
    single_phase,
)
from cem.planner.solve import check_plan, plan_site

N = 12


@st.composite
def small_sites(draw: st.DrawFn) -> Problem:
    """1-4 EVs (1- or 3-phase, min current, window), maybe a battery and PV, tight limits."""
    fuse_a = draw(st.sampled_from([16.0, 25.0, 35.0]))
    gtv = draw(st.integers(6_000, 30_000))
    imp = np.full(N, gtv, dtype=np.int64)
    if draw(st.booleans()):  # a congestion window
        a = draw(st.integers(0, N - 2))
        imp[a:a + draw(st.integers(1, 4))] = draw(st.integers(3_000, gtv))
    prices = np.array(draw(st.lists(st.floats(-0.2, 0.6), min_size=N, max_size=N)))
    base = np.full(N, draw(st.integers(0, 1_500)))
    pr = Problem(
        start=datetime(2026, 3, 2, tzinfo=UTC), ptu_minutes=15, n_ptus=N,
        limits=SiteLimits(fuse_a=fuse_a, phases=3, voltage_v=230.0, import_limit_w=imp,
                          export_limit_w=np.full(N, draw(st.integers(0, 10_000))),
                          peak_price_eur_per_kw=draw(st.sampled_from([0.0, 3.0])),
                          peak_so_far_w=draw(st.integers(0, 5_000))),
        prices=Prices(prices, prices - draw(st.floats(0.0, 0.2))),
        fixed=[FixedLoad("base", base)],
    )
    for k in range(draw(st.integers(1, 4))):
        one = draw(st.booleans())
        amps = draw(st.sampled_from([10, 16, 32]))
        phases = 1 if one else 3
        arrive = draw(st.integers(0, N - 1))
        leave = draw(st.integers(arrive, N))
        target = draw(st.integers(0, 30_000))
        v2g = draw(st.sampled_from([0, 0, 3_000]))
        pr.storage.append(StorageAsset(
            id=f"ev{k}", kind="ev", charge_max_w=amps * 230 * phases, charge_min_w=6 * 230 * phases,
            discharge_max_w=v2g, discharge_min_w=min(v2g, 6 * 230 * phases),
            level_wh=0 if not v2g else 5_000, level_max_wh=max(target, 5_000 if v2g else 0),
            available_from=arrive, available_until=leave, target_wh=target,
            priority=draw(st.integers(1, 3)),
            phase_share=single_phase(draw(st.sampled_from(["L1", "L2", "L3"]))) if one else THREE_PHASE,
            charge_efficiency=0.95 if v2g else 1.0, discharge_efficiency=0.95 if v2g else 1.0))
    if draw(st.booleans()):
        pr.storage.append(StorageAsset(id="bat", kind="battery", charge_max_w=4_000, discharge_max_w=4_000,
                                       charge_efficiency=0.95, discharge_efficiency=0.95, level_wh=4_000,
                                       level_min_wh=1_000, level_max_wh=8_000))
    if draw(st.booleans()):
        pv = np.array(draw(st.lists(st.integers(0, 12_000), min_size=N, max_size=N)))
        pr.curtailable.append(Curtailable("pv", pv, curtailable=True))
    if draw(st.booleans()):  # an OMBC/DDBC device: off or a power range, maybe producing
        run = draw(st.sampled_from([(500, 2_000), (-2_000, -500)]))
        pr.modes.append(ModeAsset("dev", [PowerMode("off", 0, 0), PowerMode("run", *run)],
                                  min_on_ptus=draw(st.integers(0, 3))))
    if draw(st.booleans()):  # a PPBC profile that must run once
        first = draw(st.integers(0, N - 3))
        latest = draw(st.integers(first, N - 2))
        # maybe an alternative shape (a longer, flatter sequence) with its own, later window
        alternatives = [ProfileOption(np.array([400, 400, 400]), first + 1, latest - 1)] \
            if draw(st.booleans()) else []
        pr.profiles.append(ShiftableProfile("washer", np.array([1_000, 500]), earliest_start=first,
                                            latest_start=latest, alternatives=alternatives))
    return pr


def _ev_rules_hold(pr: Problem, plan: object) -> None:
    for a in pr.storage:
        p = plan.power_w[a.id]
        last = N if a.available_until is None else a.available_until
        assert np.all(p[:a.available_from] == 0) and np.all(p[last:] == 0)
        on = p > 0
        assert np.all((p[on] >= a.charge_min_w) & (p[on] <= a.charge_max_w))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_sites())
def test_every_plan_keeps_the_hard_limits_and_ev_rules(pr: Problem) -> None:
    plan = plan_site(pr, time_limit_s=0.3)
    assert check_plan(pr, plan) == []
    _ev_rules_hold(pr, plan)
    assert plan.lp_bound_eur is not None
    assert plan.lp_bound_eur <= plan.objective_eur + 1e-6 * max(1.0, abs(plan.objective_eur))
    assert plan.gap is not None and plan.gap >= 0


@settings(max_examples=30, deadline=None)
@given(small_sites())
def test_the_fallback_keeps_the_hard_limits(pr: Problem) -> None:
    plan = plan_site(pr, use_lp=False, use_cpsat=False)
    assert plan.status == "FALLBACK"
    assert check_plan(pr, plan) == []
    _ev_rules_hold(pr, plan)
