"""The LP relaxation of the site plan, solved with HiGHS: a lower bound and a fractional plan.

The LP has the same variables, limits and objective as the CP-SAT model (see `layout.py`),
with the integrality dropped: an EV's {0} U [min, max] becomes [0, max], mode choices and a
profile's (shape, start) choice become fractions. Its optimum is therefore a lower bound on
every plan's objective, and its solution is the starting point that `hint.py` rounds and
repairs into a plan.
The matrix is assembled from numpy index arrays (kW and kWh, for conditioning) and handed to
HiGHS in one `passModel` call.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import highspy
import numpy as np

from cem.planner.dual_bound import LpShape, dual_bound, implied_boxes
from cem.planner.layout import (
    SEGMENT_FACTORS,
    TOL_EUR_PER_WH,
    Dispatch,
    Layout,
    charge_price,
    ptu_epoch,
    start_options,
)

INF = highspy.kHighsInf

# what each column and row is, for `lp_key`
(C_CHARGE, C_DISCHARGE, C_CURTAIL, C_GRID, C_GROUP, C_IMPORT, C_PEAK, C_MODE_ON, C_MODE_POWER,
 C_PROFILE, C_UNMET, C_MILESTONE, C_LEVEL, C_LEVEL_MIN) = range(1, 15)
(R_GRID, R_GROUP, R_IMPORT, R_PEAK, R_MODE_ONE, R_MODE_HI, R_MODE_LO, R_PROFILE_ONE, R_FUSE,
 R_ENERGY, R_CAP, R_MILESTONE, R_LEVEL, R_LEVEL_MIN, R_LEVEL_TARGET) = range(1, 16)


def entity_key(name: str) -> int:
    """A stable 28-bit number for an asset, group or mode id (the same in every replan)."""
    return zlib.crc32(name.encode()) & 0xFFFFFFF


def lp_key(kind: int, entity: np.ndarray | int = 0, sub: np.ndarray | int = 0,
           ptu: np.ndarray | int = 0) -> np.ndarray:
    """One int64 naming a column or row the same way in every replan: what it is (`kind`),
    whose (`entity_key`), which part (`sub`: a segment, mode, phase or side) and for which PTU
    (counted from the epoch, so PTU 3 now is PTU 2 a PTU later). Two things sharing a key
    only make a warm start a little less warm."""
    return ((np.int64(kind) << 57) | ((np.asarray(sub, dtype=np.int64) & 0x3F) << 51)
            | (np.asarray(entity, dtype=np.int64) << 23) | (np.asarray(ptu, dtype=np.int64) & 0x7FFFFF))



class _LpArrays:
    """Columns, rows and coefficients collected as numpy blocks."""

    def __init__(self) -> None:
        self.col_lb: list[np.ndarray] = []
        self.col_ub: list[np.ndarray] = []
        self.col_cost: list[np.ndarray] = []
        self.n_cols = 0
        self.row_lb: list[np.ndarray] = []
        self.row_ub: list[np.ndarray] = []
        self.n_rows = 0
        self.a_row: list[np.ndarray] = []
        self.a_col: list[np.ndarray] = []
        self.a_val: list[np.ndarray] = []
        self.col_key: list[np.ndarray] = []
        self.row_key: list[np.ndarray] = []

    def cols(self, lb: np.ndarray | float, ub: np.ndarray | float, cost: np.ndarray | float,
             count: int, key: np.ndarray) -> np.ndarray:
        """`count` new columns; `key` names each across replans (`lp_key`)."""
        idx = np.arange(self.n_cols, self.n_cols + count)
        self.col_lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)))
        self.col_ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)))
        self.col_cost.append(np.broadcast_to(np.asarray(cost, dtype=float), (count,)))
        self.col_key.append(np.broadcast_to(key, (count,)))
        self.n_cols += count
        return idx

    def rows(self, lb: np.ndarray | float, ub: np.ndarray | float, count: int,
             key: np.ndarray) -> np.ndarray:
        """`count` new rows; `key` names each across replans (`lp_key`)."""
        idx = np.arange(self.n_rows, self.n_rows + count)
        self.row_lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)))
        self.row_ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)))
        self.row_key.append(np.broadcast_to(key, (count,)))
        self.n_rows += count
        return idx

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """The key of every column and every row, in order."""
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(self.col_key) if self.col_key else empty,
                np.concatenate(self.row_key) if self.row_key else empty)

    def coef(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | float) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.broadcast_to(np.asarray(vals, dtype=float), rows.shape)
        keep = vals != 0
        self.a_row.append(rows[keep])
        self.a_col.append(cols[keep])
        self.a_val.append(vals[keep])

    def to_highs(self) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_ = self.n_cols
        lp.num_row_ = self.n_rows
        lp.col_cost_ = np.concatenate(self.col_cost) if self.col_cost else np.zeros(0)
        lp.col_lower_ = np.concatenate(self.col_lb) if self.col_lb else np.zeros(0)
        lp.col_upper_ = np.concatenate(self.col_ub) if self.col_ub else np.zeros(0)
        lp.row_lower_ = np.concatenate(self.row_lb) if self.row_lb else np.zeros(0)
        lp.row_upper_ = np.concatenate(self.row_ub) if self.row_ub else np.zeros(0)
        r = np.concatenate(self.a_row) if self.a_row else np.zeros(0, dtype=np.int64)
        c = np.concatenate(self.a_col) if self.a_col else np.zeros(0, dtype=np.int64)
        v = np.concatenate(self.a_val) if self.a_val else np.zeros(0)
        order = np.argsort(c, kind="stable")
        counts = np.bincount(c, minlength=self.n_cols)
        start = np.zeros(self.n_cols + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = start.astype(np.int32)
        lp.a_matrix_.index_ = r[order].astype(np.int32)
        lp.a_matrix_.value_ = v[order]
        lp.a_matrix_.num_col_ = self.n_cols
        lp.a_matrix_.num_row_ = self.n_rows
        return lp


@dataclass
class LpIndex:
    """Where each planner quantity sits among the LP columns (-1: no column)."""

    charge: np.ndarray  # (S, n)
    discharge: np.ndarray  # (S, n)
    curtail: np.ndarray  # (K, n)
    mode_on: list[np.ndarray] = field(default_factory=list)  # per ModeAsset (n, modes)
    mode_power: list[np.ndarray] = field(default_factory=list)  # per ModeAsset (n, modes)
    profile_on: list[np.ndarray] = field(default_factory=list)  # per profile: (shape, start)s
    profile_starts: list[np.ndarray] = field(default_factory=list)  # start of each column
    profile_alts: list[np.ndarray] = field(default_factory=list)  # shape (option) of each column
    agg_rows: np.ndarray | None = None  # (groups, n) row of the per-phase-group power sum
    grp_of: np.ndarray | None = None  # (S,) group of each storage asset
    # (S,) target row and level_max row of charge-only assets (-1: none)
    energy_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cap_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    full_charge: np.ndarray | None = None  # (S, n) every possible charge column


@dataclass
class LpResult:
    status: str  # "OPTIMAL" or HiGHS's word for what happened
    bound_eur: float | None
    dispatch: Dispatch | None  # fractional (W)
    mode_weight: list[np.ndarray] = field(default_factory=list)  # (n, modes) fractions
    profile_weight: list[np.ndarray] = field(default_factory=list)
    build_s: float = 0.0
    solve_s: float = 0.0
    highs: highspy.Highs | None = None  # the solved model, for `polish` (warm start)
    index: LpIndex | None = None
    warm: bool = False  # started from the previous replan's basis (`LpMemory`)
    iterations: int = 0  # simplex iterations
    # the LP was not solved: a lower bound from row prices (`dual_bound`), and the LP as built
    # (for `polish` on an instance of its own)
    dual_bound_eur: float | None = None
    model: highspy.HighsLp | None = None
    built: BuiltLp | None = None  # the LP as built (for a bound at its prices, or from the
    # EVs' own problems after it)


# HighsBasisStatus values as numbers
_LOWER, _BASIC, _UPPER, _ZERO = 0, 1, 2, 3
_STATUS = [highspy.HighsBasisStatus.kLower, highspy.HighsBasisStatus.kBasic,
           highspy.HighsBasisStatus.kUpper, highspy.HighsBasisStatus.kZero,
           highspy.HighsBasisStatus.kNonbasic]


class LpMemory:
    """What one site's planner keeps from one replan's LP for the next: its basis, with every
    column and row named by its key (`lp_key`), so a basis still fits when EVs came or went,
    levels changed or a PTU passed (the next replan's LP is mostly the same LP).

    HiGHS starts its simplex from the mapped basis (an "alien" basis, which it completes where
    the LP changed): at 1000 EVs a replan after small changes needs a tenth of the iterations
    of a cold start. A basis HiGHS left at its time limit is kept too: the next replan goes on
    from where this one stopped. Not thread-safe: one replan at a time, as the control loop
    plans.
    """

    def __init__(self) -> None:
        # sorted keys, their basis status (and for columns the reduced cost)
        self._cols: tuple[np.ndarray, np.ndarray] | None = None
        self._rows: tuple[np.ndarray, np.ndarray] | None = None
        self._col_dual: np.ndarray | None = None
        # sorted row keys and the row prices that gave the best bound of the last LP
        self._row_price: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._turn = 0  # which solve may write the basis (the latest one)
        # the last LP, when its time ran out before it was solved: (HiGHS, keys, model, turn)
        self.unfinished: tuple[highspy.Highs, np.ndarray, np.ndarray, highspy.HighsLp, int] | None = None
        # the last LP was solved by `finish` after its replan: its basis is the optimum
        self.finished = False

    def claim(self) -> int:
        """A new solve starts: only its basis is kept from now on (not an older one's)."""
        with self._lock:
            self._turn += 1
            self.unfinished = None
            self.finished = False
            return self._turn

    def finish(self, stop: threading.Event, slice_s: float = 0.2, cap_s: float = 120.0) -> bool:
        """Go on solving the unfinished LP (in slices of `slice_s`, keeping its basis after
        each) until it is solved, `stop` is set, a newer solve started or `cap_s` passed.
        Meant for a thread between replans: the next replan starts from a basis nearer the
        optimum. True when the LP was solved."""
        job = self.unfinished
        if job is None:
            return False
        h, col_key, row_key, model, turn = job
        began = time.perf_counter()
        while not stop.is_set() and self._turn == turn and time.perf_counter() - began < cap_s:
            # HiGHS's time limit counts from the instance's first run: a slice more each time
            h.setOptionValue("time_limit", h.getRunTime() + slice_s)
            h.run()
            done = h.getModelStatus() == highspy.HighsModelStatus.kOptimal
            if stop.is_set():
                return False
            self.remember(col_key, row_key, h, model, turn)
            if done:
                with self._lock:
                    if self.unfinished is job:
                        self.unfinished = None
                        self.finished = True
                return True
        return False

    @property
    def empty(self) -> bool:
        return self._cols is None

    def forget(self) -> None:
        with self._lock:
            self._cols = self._rows = self._col_dual = None
            self._row_price = None
            self.unfinished = None

    def remember(self, col_key: np.ndarray, row_key: np.ndarray, h: highspy.Highs,
                 model: highspy.HighsLp, turn: int | None = None) -> None:
        """Keep the basis HiGHS has now (for the LP whose keys are given), unless a newer
        solve than `turn` has started since.

        Read as arrays: the basic variables, and for the others the bound their value sits
        at (HiGHS's own status list costs a Python object per column)."""
        ok, basic = h.getBasicVariables()  # type: ignore[attr-defined]  # not in highspy's stubs
        solution = h.getSolution()
        if ok != highspy.HighsStatus.kOk or not solution.value_valid \
                or len(solution.col_value) != len(col_key) or len(basic) != len(row_key):
            return
        basic = np.asarray(basic, dtype=np.int64)
        cols = _nonbasic_at(np.asarray(solution.col_value), np.asarray(model.col_lower_),
                            np.asarray(model.col_upper_))
        rows = _nonbasic_at(np.asarray(solution.row_value), np.asarray(model.row_lower_),
                            np.asarray(model.row_upper_))
        cols[basic[basic >= 0]] = _BASIC
        rows[-1 - basic[basic < 0]] = _BASIC
        dual = np.asarray(solution.col_dual, dtype=float) if solution.dual_valid \
            and len(solution.col_dual) == len(col_key) else np.zeros(len(col_key))
        order = np.argsort(col_key, kind="stable")
        row_order = np.argsort(row_key, kind="stable")
        with self._lock:
            if turn is not None and turn != self._turn:
                return
            self._cols = (col_key[order], cols[order])
            self._col_dual = np.abs(dual[order])
            self._rows = (row_key[row_order], rows[row_order])

    def keep_prices(self, row_key: np.ndarray, price: np.ndarray) -> None:
        """Keep these row prices (by row key) for the next replan's `prices_for`."""
        order = np.argsort(row_key, kind="stable")
        with self._lock:
            self._row_price = (row_key[order], np.asarray(price, dtype=float)[order])

    def prices_for(self, row_key: np.ndarray) -> np.ndarray | None:
        """The kept row prices laid onto an LP with these row keys (a row the last LP did
        not have: the same row a PTU earlier, else 0), or None when none are kept."""
        with self._lock:
            kept = self._row_price
        if kept is None:
            return None
        price, _ = _lay_onto_values(kept, row_key)
        return price

    def basis_for(self, col_key: np.ndarray, row_key: np.ndarray, model: highspy.HighsLp
                  ) -> highspy.HighsBasis | None:
        """The remembered basis laid onto an LP with these keys (None: nothing remembered).

        A column or row the last LP had keeps its status; one for a PTU the last LP did not
        reach (the horizon moved on) takes the status of the PTU before it; other new columns
        start at a bound, new rows with their slack basic. An asset whose basic column is
        gone (a PTU passed) gets instead the one of its columns that was nearest to entering
        the basis (least reduced cost), so its energy row keeps its price. Statuses that
        name a bound the new LP does not have move to the one it has; HiGHS repairs the
        count of basic variables (alien basis).
        """
        with self._lock:
            cols, rows, dual = self._cols, self._rows, self._col_dual
        if cols is None or rows is None or dual is None:
            return None
        col, col_at = _lay_onto(cols, col_key)
        row, _ = _lay_onto(rows, row_key)
        row = np.where(row < 0, _BASIC, row).astype(np.int8)
        short = len(row_key) - int((col == _BASIC).sum()) - int((row == _BASIC).sum())
        _keep_basic_per_asset(cols, dual, col_key, col, col_at, short)
        col = np.where(col < 0, _LOWER, col).astype(np.int8)
        col = _at_a_bound(col, np.asarray(model.col_lower_), np.asarray(model.col_upper_))
        row = _at_a_bound(row, np.asarray(model.row_lower_), np.asarray(model.row_upper_))
        basis = highspy.HighsBasis()
        basis.col_status = [_STATUS[v] for v in col.tolist()]
        basis.row_status = [_STATUS[v] for v in row.tolist()]
        basis.alien = True
        basis.valid = True
        return basis



def _keep_basic_per_asset(old: tuple[np.ndarray, np.ndarray], old_dual: np.ndarray,
                          col_key: np.ndarray, col: np.ndarray, col_at: np.ndarray,
                          budget: int) -> None:
    """Replace basic power columns that are gone by columns of the new LP (at most `budget`,
    the basic variables the new LP lacks), least reduced cost first: one of the same asset
    (a PTU passed), else one of the same kind and PTU (its asset left: another asset's power
    at that PTU keeps the site rows' prices). In place."""
    if budget <= 0:
        return
    old_keys, old_status = old
    still = np.zeros(len(old_keys), dtype=bool)
    still[col_at[col_at >= 0]] = True
    lost = old_keys[(old_status == _BASIC) & ~still]
    lost = lost[np.isin(lost >> 57, _POWER_KINDS)]
    if len(lost) == 0:
        return
    score = np.full(len(col_key), np.inf)
    known = col_at >= 0
    score[known] = old_dual[col_at[known]]
    free = col != _BASIC
    mine, left = _best_per_group(col_key >> 23, lost >> 23, free, score)  # same asset
    free[mine] = False
    by_ptu = (lost[left] >> 57 << 23) | (lost[left] & 0x7FFFFF)  # same kind and PTU
    others, _ = _best_per_group((col_key >> 57 << 23) | (col_key & 0x7FFFFF), by_ptu, free, score)
    chosen = np.concatenate([mine[np.argsort(score[mine], kind="stable")],
                             others[np.argsort(score[others], kind="stable")]])
    col[chosen[:budget]] = _BASIC


_POWER_KINDS = np.array([C_CHARGE, C_DISCHARGE, C_CURTAIL, C_LEVEL])


def _best_per_group(group: np.ndarray, wanted: np.ndarray, free: np.ndarray, score: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each entry of `wanted`, a distinct free column of that group, least score first:
    the columns found, and which entries of `wanted` found none (bool array)."""
    names, count = np.unique(wanted, return_counts=True)
    cand = np.flatnonzero(np.isin(group, names) & free & np.isfinite(score))
    cand = cand[np.lexsort((score[cand], group[cand]))]
    owners = group[cand]
    rank = np.arange(len(cand)) - np.searchsorted(owners, owners, side="left")
    chosen = cand[rank < count[np.searchsorted(names, owners)]] if len(cand) else cand
    found = dict(zip(*np.unique(group[chosen], return_counts=True), strict=True))
    left = np.zeros(len(wanted), dtype=bool)
    for k, name in enumerate(wanted.tolist()):
        if found.get(name, 0) > 0:
            found[name] -= 1
        else:
            left[k] = True
    return chosen, left


def _lay_onto(old: tuple[np.ndarray, np.ndarray], keys: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The old status of each key (-1: none) and where it was among the old keys (-1: new).

    A key the old LP did not have takes the status of the same thing a PTU earlier, when
    the old LP had that (the PTU the horizon moved on to)."""
    return _laid_onto(old, keys, np.full(len(keys), -1, dtype=np.int8))


def _lay_onto_values(old: tuple[np.ndarray, np.ndarray], keys: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`_lay_onto` for float values (0 where nothing fits)."""
    return _laid_onto(old, keys, np.zeros(len(keys)))


def _laid_onto(old: tuple[np.ndarray, np.ndarray], keys: np.ndarray, out: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """`out` (its fill where nothing fits) with the old value of each key, or of the same
    thing a PTU earlier for a key the old LP did not have; and where each key was (-1: new)."""
    old_keys, old_value = old
    at = np.full(len(keys), -1, dtype=np.int64)
    if len(old_keys) == 0 or len(keys) == 0:
        return out, at
    pos = np.minimum(np.searchsorted(old_keys, keys), len(old_keys) - 1)
    found = old_keys[pos] == keys
    out[found] = old_value[pos[found]]
    at[found] = pos[found]
    new = np.flatnonzero(~found & ((keys & 0x7FFFFF) > 0))
    if len(new):
        before = keys[new] - 1
        pos = np.minimum(np.searchsorted(old_keys, before), len(old_keys) - 1)
        hit = old_keys[pos] == before
        out[new[hit]] = old_value[pos[hit]]
    return out, at


def _nonbasic_at(value: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The status of a nonbasic column (or row) from its value: at its upper bound, else at
    its lower one, else (free) at zero."""
    finite = upper < INF
    top = np.where(finite, upper, 0.0)
    up = finite & (value >= top - 1e-9 * np.maximum(1.0, np.abs(top)))
    out = np.where(lower > -INF, _LOWER, np.where(upper < INF, _UPPER, _ZERO)).astype(np.int8)
    out[up & (value > lower)] = _UPPER
    return out


def _at_a_bound(status: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Nonbasic statuses on a bound the column (or row) has: the upper one if it was there
    (or is the only one), else the lower one, else (free) at zero."""
    lo = lower > -INF
    up = upper < INF
    at_upper = up & ((status == _UPPER) | ~lo)
    nonbasic = np.where(at_upper, _UPPER, np.where(lo, _LOWER, _ZERO)).astype(np.int8)
    return np.where(status == _BASIC, status, nonbasic).astype(np.int8)


def _grid_index(mask: np.ndarray, lp: _LpArrays, lb: np.ndarray, ub: np.ndarray,
                cost: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Columns for the True cells of `mask` (row-major); bounds/cost/key given per cell."""
    idx = np.full(mask.shape, -1, dtype=np.int64)
    count = int(mask.sum())
    idx[mask] = lp.cols(lb[mask], ub[mask], cost[mask], count, np.broadcast_to(key, mask.shape)[mask])
    return idx


def build_lp(lay: Layout, keep: np.ndarray | None = None) -> tuple[_LpArrays, LpIndex]:
    """The LP relaxation as arrays (kW, kWh, EUR); `keep` (S, n) limits the charge columns of
    charge-only assets to a subset (the rest is priced in later by `solve_lp`)."""
    n, S, K = lay.n, lay.s, lay.k
    hours = lay.ptu_h
    pr = lay.problem
    lp = _LpArrays()
    ones = np.ones((S, n))
    t_abs = ptu_epoch(lay.problem) + np.arange(n)
    ent = np.array([entity_key(a) for a in lay.ids], dtype=np.int64)
    full_c = lay.avail & (lay.cmax[:, None] > 0)
    levels = lp_level_assets(lay)
    c_mask = full_c if keep is None else full_c & (keep | levels[:, None])
    d_mask = lay.avail & (lay.dmax[:, None] > 0)
    grid_key = lp_key(C_CHARGE, ent[:, None], 0, t_abs[None, :])
    c_idx = _grid_index(c_mask, lp, 0 * ones, lay.cmax[:, None] / 1000 * ones,
                        charge_price(lay) * hours, grid_key)
    d_idx = _grid_index(d_mask, lp, 0 * ones, lay.dmax[:, None] / 1000 * ones, 0 * ones,
                        grid_key + (np.int64(C_DISCHARGE - C_CHARGE) << 57))
    cur_mask = lay.pv_curtailable[:, None] & (lay.pv > 0) if K else np.zeros((0, n), dtype=bool)
    pv_ent = np.array([entity_key(pid) for pid in lay.pv_ids], dtype=np.int64)
    cur_idx = _grid_index(cur_mask, lp, np.zeros((K, n)), lay.pv / 1000, np.zeros((K, n)),
                          lp_key(C_CURTAIL, pv_ent[:, None], 0, t_abs[None, :]))
    g = lp.cols(-lay.export_lim / 1000, lay.import_lim / 1000, lay.p_exp_eff * hours, n,
                lp_key(C_GRID, 0, 0, t_abs))
    t_all = np.arange(n)
    # g[t] = fixed - pv + sum(charge - discharge) + curtail + modes + profiles
    gdef = lp.rows((lay.fixed_w - lay.pv.sum(axis=0)) / 1000, (lay.fixed_w - lay.pv.sum(axis=0)) / 1000, n,
                   lp_key(R_GRID, 0, 0, t_abs))
    lp.coef(gdef, g, 1.0)
    ci, ct = np.nonzero(c_mask)
    di, dtt = np.nonzero(d_mask)
    # storage power summed per phase-share group and PTU (agg[grp, t]): every storage column
    # then has two nonzeros (its group sum and its energy row), not one per phase row
    groups, grp_of = np.unique(np.round(lay.share, 9), axis=0, return_inverse=True)
    grp_of = np.asarray(grp_of).reshape(-1)
    grp_ent = np.array([entity_key("group " + ",".join(f"{v:.9f}" for v in gs)) for gs in groups],
                       dtype=np.int64)
    agg = lp.cols(-INF, INF, 0.0, len(groups) * n,
                  lp_key(C_GROUP, grp_ent[:, None], 0, t_abs[None, :]).ravel()).reshape(len(groups), n)
    agg_rows = lp.rows(0.0, 0.0, len(groups) * n,
                       lp_key(R_GROUP, grp_ent[:, None], 0, t_abs[None, :]).ravel()).reshape(len(groups), n)
    lp.coef(agg_rows.ravel(), agg.ravel(), 1.0)
    lp.coef(agg_rows[grp_of[ci], ct], c_idx[ci, ct], -1.0)
    lp.coef(agg_rows[grp_of[di], dtt], d_idx[di, dtt], 1.0)
    lp.coef(np.tile(gdef, len(groups)), agg.ravel(), -1.0)
    ki, kt = np.nonzero(cur_mask)
    lp.coef(gdef[kt], cur_idx[ki, kt], -1.0)
    # import above the export price: imp >= g
    extra = lay.p_imp - lay.p_exp_eff
    need_imp = extra > 0
    if np.any(need_imp):
        ts = t_all[need_imp]
        imp = lp.cols(0.0, INF, extra[ts] * hours[ts], len(ts), lp_key(C_IMPORT, 0, 0, t_abs[ts]))
        r = lp.rows(0.0, INF, len(ts), lp_key(R_IMPORT, 0, 0, t_abs[ts]))
        lp.coef(r, imp, 1.0)
        lp.coef(r, g[ts], -1.0)
    if lay.peak_price > 0:
        peak = lp.cols(lay.peak_so_far / 1000, INF, lay.peak_price * 1000, 1, lp_key(C_PEAK))
        r = lp.rows(0.0, INF, n, lp_key(R_PEAK, 0, 0, t_abs))
        lp.coef(r, np.full(n, peak[0]), 1.0)
        lp.coef(r, g, -1.0)
    index = LpIndex(charge=c_idx, discharge=d_idx, curtail=cur_idx, agg_rows=agg_rows, grp_of=grp_of,
                    energy_row=np.full(S, -1, dtype=np.int64), cap_row=np.full(S, -1, dtype=np.int64),
                    full_charge=full_c)
    # modes and shiftable profiles (relaxed choices)
    mode_cols_g: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # t, col, coef, share
    for m in pr.modes:
        nm = len(m.modes)
        lo = np.array([pm.min_w for pm in m.modes], dtype=float) / 1000
        hi = np.array([pm.max_w for pm in m.modes], dtype=float) / 1000
        m_ent = entity_key(m.id)
        per_mode = (np.tile(np.arange(nm), n), np.repeat(t_abs, nm))  # (mode, PTU) of each cell
        on = lp.cols(0.0, 1.0, 0.0, n * nm, lp_key(C_MODE_ON, m_ent, *per_mode)).reshape(n, nm)
        q = lp.cols(np.tile(np.minimum(lo, 0), n), np.tile(np.maximum(hi, 0), n), 0.0, n * nm,
                    lp_key(C_MODE_POWER, m_ent, *per_mode)).reshape(n, nm)
        one = lp.rows(1.0, 1.0, n, lp_key(R_MODE_ONE, m_ent, 0, t_abs))
        lp.coef(np.repeat(one, nm), on.ravel(), 1.0)
        r_hi = lp.rows(-INF, 0.0, n * nm, lp_key(R_MODE_HI, m_ent, *per_mode))
        lp.coef(r_hi, q.ravel(), 1.0)
        lp.coef(r_hi, on.ravel(), -np.tile(hi, n))
        r_lo = lp.rows(0.0, INF, n * nm, lp_key(R_MODE_LO, m_ent, *per_mode))
        lp.coef(r_lo, q.ravel(), 1.0)
        lp.coef(r_lo, on.ravel(), -np.tile(lo, n))
        tt = np.repeat(t_all, nm)
        lp.coef(gdef[tt], q.ravel(), -1.0)
        index.mode_on.append(on)
        index.mode_power.append(q)
        mode_cols_g.append((tt, q.ravel(), np.ones(n * nm), np.asarray(m.phase_share, dtype=float)))
    for p in pr.profiles:
        # one column per (shape, start): exactly one of them runs
        options = start_options(p, n)
        starts = np.concatenate([st for _k, _shape, st in options])
        alts = np.concatenate([np.full(len(st), k) for k, _shape, st in options])
        p_ent = entity_key(p.id)
        on = lp.cols(0.0, 1.0, 0.0, len(starts), lp_key(C_PROFILE, p_ent, alts, t_abs[0] + starts))
        one = lp.rows(1.0, 1.0, 1, lp_key(R_PROFILE_ONE, p_ent))
        lp.coef(np.repeat(one, len(starts)), on, 1.0)
        tt_l, cc_l, vv_l = [], [], []
        col_at = iter(on)
        for _k, shape, st in options:
            prof = shape / 1000
            for s_ in st:
                col = next(col_at)
                k = min(len(prof), n - s_)
                tt_l.append(np.arange(s_, s_ + k))
                cc_l.append(np.full(k, col))
                vv_l.append(prof[:k])
        tt = np.concatenate(tt_l)
        cc = np.concatenate(cc_l)
        vv = np.concatenate(vv_l)
        lp.coef(gdef[tt], cc, -vv)
        index.profile_on.append(on)
        index.profile_starts.append(starts)
        index.profile_alts.append(alts)
        mode_cols_g.append((tt, cc, vv, np.asarray(p.phase_share, dtype=float)))
    # fuse per phase: -fuse_dn <= phase load <= fuse_up, only where it can bind
    pv_phase = lay.pv_share.T @ lay.pv if K else np.zeros((3, n))
    const = (lay.fixed_phase - pv_phase) / 1000
    for ph in range(3):
        sh = lay.share[:, ph]
        up = const[ph] + (sh[:, None] * lay.cmax[:, None] * full_c).sum(axis=0) / 1000
        dn = const[ph] - (sh[:, None] * lay.dmax[:, None] * d_mask).sum(axis=0) / 1000
        if K:
            psh = lay.pv_share[:, ph]
            up = up + (psh[:, None] * lay.pv * cur_mask).sum(axis=0) / 1000
        rows_needed = (up > lay.fuse_up[ph] / 1000 + 1e-9) | (dn < -lay.fuse_dn[ph] / 1000 - 1e-9)
        for tt, _cc, _vv, share in mode_cols_g:  # modes and profiles: keep their PTUs' rows
            if share[ph] != 0:
                rows_needed[tt] = True
        if not np.any(rows_needed):
            continue
        ts = t_all[rows_needed]
        rmap = np.full(n, -1, dtype=np.int64)
        rmap[ts] = lp.rows(-lay.fuse_dn[ph, ts] / 1000 - const[ph, ts],
                           lay.fuse_up[ph, ts] / 1000 - const[ph, ts], len(ts),
                           lp_key(R_FUSE, 0, ph, t_abs[ts]))
        for gi, gshare in enumerate(groups):
            if gshare[ph] != 0:
                lp.coef(rmap[ts], agg[gi, ts], gshare[ph])
        if K:
            psh = lay.pv_share[:, ph]
            sel = rows_needed[kt] & (psh[ki] != 0)
            lp.coef(rmap[kt[sel]], cur_idx[ki[sel], kt[sel]], psh[ki[sel]])
        for tt, cc, vv, share in mode_cols_g:
            s_ = share[ph] / share.sum() if share.sum() > 0 else 1 / 3
            sel = rows_needed[tt]
            if s_ != 0 and np.any(sel):
                lp.coef(rmap[tt[sel]], cc[sel], s_ * vv[sel])
    # energy and levels of storage assets
    has_t = ~np.isnan(lay.target)
    need = np.where(has_t, np.nan_to_num(lay.target) - lay.level0, 0.0)
    mono = ~levels
    e_coef = hours * lay.eta_c[:, None]  # (S, n) kWh level per kW charged in each PTU
    # monotone assets: one sum row for the target, one for the level cap
    tgt = np.flatnonzero(mono & has_t & (need > 0))
    cap = lay.lmax - lay.level0
    # target == level_max (an EV asking to be full): the target row is an equality and
    # stands for the level cap too (unmet >= 0), one row fewer per EV
    exact = np.zeros(S, dtype=bool)
    exact[tgt] = np.abs(cap[tgt] - need[tgt]) < 1e-6
    milestones, folded = _milestone_sides(lay, mono, tgt, e_coef, full_c)
    if len(tgt):
        r = lp.rows(need[tgt] / 1000, np.where(exact[tgt], need[tgt] / 1000, INF), len(tgt),
                    lp_key(R_ENERGY, ent[tgt]))
        rmap = np.full(S, -1, dtype=np.int64)
        rmap[tgt] = r
        index.energy_row[tgt] = r
        sel = rmap[ci] >= 0
        lp.coef(rmap[ci[sel]], c_idx[ci[sel], ct[sel]], e_coef[ci[sel], ct[sel]])
        _unmet_cols(lp, lay, r, tgt, need, ent[tgt], extra_eur_per_wh=folded[tgt])
    # every PTU of the window at full power (PTU 0 counts for its share)
    max_energy = (full_c * lay.part).sum(axis=1) * lay.cmax * (lay.dt_h * lay.eta_c)
    capped = np.flatnonzero(mono & ~exact & (max_energy > cap + 1e-6))
    if len(capped):
        r = lp.rows(-INF, np.maximum(cap[capped], 0) / 1000, len(capped), lp_key(R_CAP, ent[capped]))
        rmap = np.full(S, -1, dtype=np.int64)
        rmap[capped] = r
        index.cap_row[capped] = r
        sel = rmap[ci] >= 0
        lp.coef(rmap[ci[sel]], c_idx[ci[sel], ct[sel]], e_coef[ci[sel], ct[sel]])
    # milestones of monotone assets (an EV's target before its departure): partial sums, only
    # the sides that can bind (`_milestone_sides`)
    m_asset, m_ptu, m_lo, m_hi, m_w = milestones
    if len(m_asset):
        side = np.isfinite(m_lo).astype(np.int64)
        r = lp.rows(m_lo, m_hi, len(m_asset), lp_key(R_MILESTONE, ent[m_asset], side, t_abs[0] + m_ptu))
        # each row sums the asset's charge columns before its milestone PTU
        length = m_ptu - lay.first[m_asset]
        rows_of = np.repeat(np.arange(len(m_asset)), length)
        ii = m_asset[rows_of]
        tt = lay.first[ii] + np.arange(len(rows_of)) - np.repeat(np.cumsum(length) - length, length)
        cc = c_idx[ii, tt]
        ok = cc >= 0
        lp.coef(r[rows_of[ok]], cc[ok], e_coef[ii[ok], tt[ok]])
        # a missed side costs the asset's weight per Wh: below lo (+1) or above hi (-1)
        u = lp.cols(0.0, INF, m_w * 1000, len(m_asset),
                    lp_key(C_MILESTONE, ent[m_asset], side, t_abs[0] + m_ptu))
        lp.coef(r, u, np.where(side == 1, 1.0, -1.0))
    for i in np.flatnonzero(levels):
        a, b = int(lay.first[i]), int(lay.last[i])
        w = b - a
        if w <= 0:
            continue
        lv = lp.cols(-INF, lay.lmax[i] / 1000, 0.0, w,
                     lp_key(C_LEVEL, ent[i], 0, t_abs[a:b]))  # level after PTU a..b-1
        rhs = -lay.usage[i, a:b] / 1000
        rhs[0] += lay.level0[i] / 1000  # the level before PTU a is known
        rows = lp.rows(rhs, rhs, w, lp_key(R_LEVEL, ent[i], 0, t_abs[a:b]))
        lp.coef(rows, lv, 1.0)
        lp.coef(rows[1:], lv[:-1], -1.0)
        ts = np.arange(a, b)
        cc = c_idx[i, ts]
        ok = cc >= 0
        lp.coef(rows[ok], cc[ok], -hours[ts[ok]] * lay.eta_c[i])
        dd = d_idx[i, ts]
        ok = dd >= 0
        lp.coef(rows[ok], dd[ok], hours[ts[ok]] / lay.eta_d[i])
        # soft level_min
        s_cols = lp.cols(0.0, INF, lay.weight[i] * 1000, w, lp_key(C_LEVEL_MIN, ent[i], 0, t_abs[a:b]))
        r = lp.rows(lay.lmin[i] / 1000, INF, w, lp_key(R_LEVEL_MIN, ent[i], 0, t_abs[a:b]))
        lp.coef(r, lv, 1.0)
        lp.coef(r, s_cols, 1.0)
        if has_t[i]:
            r = lp.rows(lay.target[i] / 1000, INF, 1, lp_key(R_LEVEL_TARGET, ent[i]))
            lp.coef(r, lv[-1:], 1.0)
            _unmet_cols(lp, lay, r, np.array([i]), need, ent[i:i + 1])
        for ptu, level_lo, level_hi in pr.storage[i].target_profile:
            if a < ptu <= b:
                col = lv[ptu - a - 1]
                w_lo = float(pr.storage[i].milestone_eur_per_wh.get(int(ptu), lay.weight[i]))
                u = lp.cols(0.0, INF, np.array([w_lo, lay.weight[i]]) * 1000, 2,
                            lp_key(C_MILESTONE, ent[i], np.array([1, 0]), t_abs[0] + ptu))
                r = lp.rows(np.array([level_lo / 1000, -INF]), np.array([INF, level_hi / 1000]), 2,
                            lp_key(R_MILESTONE, ent[i], np.array([1, 0]), t_abs[0] + ptu))
                lp.coef(r, np.array([col, col]), 1.0)
                lp.coef(r, u, np.array([1.0, -1.0]))
    return lp, index


def lp_level_assets(lay: Layout) -> np.ndarray:
    """Assets whose level the LP must follow per PTU (S,) bool.

    A charge-only asset without usage that starts at or above its minimum only ever fills up:
    its level cap and target are sums, and a target-profile milestone is a partial sum. Giving
    such an asset per-PTU level rows (as `needs_levels` does for the repair and CP-SAT) made a
    1000-EV LP with departure milestones four times slower (3 s instead of 0.75 s).
    """
    monotone = (lay.dmax <= 0) & ~np.any(lay.usage != 0, axis=1) & (lay.level0 >= lay.lmin)
    return lay.needs_levels & ~monotone


def _unmet_cols(lp: _LpArrays, lay: Layout, rows: np.ndarray, assets: np.ndarray,
                need: np.ndarray, ent: np.ndarray, extra_eur_per_wh: np.ndarray | float = 0.0) -> None:
    """The rising unmet-energy segments (and the cheap last step) of each target row.

    `extra_eur_per_wh` (per asset) is added to every segment: a milestone at the departure
    that asks for the target itself (folded into the target row by `_milestone_sides`).
    """
    k = len(SEGMENT_FACTORS)
    seg = np.maximum(need[assets], 0) / k / 1000
    extra = np.broadcast_to(np.asarray(extra_eur_per_wh, dtype=float), (len(assets),)) * 1000
    u0 = lp.cols(0.0, lay.tol_wh[assets] / 1000, TOL_EUR_PER_WH * 1000 + extra, len(assets),
                 lp_key(C_UNMET, ent, 0))
    lp.coef(rows, u0, 1.0)
    for j, f in enumerate(SEGMENT_FACTORS):
        ub = seg if j < k - 1 else np.full(len(assets), INF)
        u = lp.cols(0.0, ub, lay.weight[assets] * 1000 * f + extra, len(assets),
                    lp_key(C_UNMET, ent, j + 1))
        lp.coef(rows, u, 1.0)


def _milestone_sides(lay: Layout, mono: np.ndarray, tgt: np.ndarray, e_coef: np.ndarray,
                     full_c: np.ndarray
                     ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                                np.ndarray]:
    """The milestone rows of monotone assets that can bind, and the milestones folded away.

    Returns the rows as arrays (asset, PTU, lo, hi, EUR per Wh missed), in kWh charged since
    the window opened (one side per row, the other infinite; the lower sides first), and per
    asset the EUR per Wh added to its unmet-target columns. A monotone asset only fills up, so of a milestone (ptu, lo, hi):
    - the lower side cannot bind when lo is at or below the starting level;
    - the upper side cannot bind when hi is at or above what the asset can reach by then
      (full power all along, or its level cap, which another row keeps);
    - a lower side at the departure that asks for the target itself is the target row's
      shortfall priced once more: its weight goes onto the unmet columns, no row.
    A live EV has three milestones (the RM's target profile and the finish margin): this
    leaves one row of them, where six made the 1000-EV LP three times the size.
    """
    S = lay.s
    folded = np.zeros(S)
    sel = mono[lay.ms_asset] & lay.needs_levels[lay.ms_asset]
    i, ptu = lay.ms_asset[sel], lay.ms_ptu[sel]
    lo = (lay.ms_lo[sel] - lay.level0[i]) / 1000
    hi = (lay.ms_hi[sel] - lay.level0[i]) / 1000
    has_row = np.zeros(S, dtype=bool)
    has_row[tgt] = True
    fold = (lo > 1e-9) & (ptu == lay.last[i]) & has_row[i] \
        & (np.abs(lay.ms_lo[sel] - np.nan_to_num(lay.target[i])) < 1e-6)
    w_lo = lay.ms_w_lo[sel]
    np.add.at(folded, i[fold], w_lo[fold])
    lower = (lo > 1e-9) & ~fold
    reach = np.cumsum(e_coef * full_c, axis=1) * lay.cmax[:, None] / 1000  # kWh by PTU end
    cap = np.maximum(lay.lmax - lay.level0, 0.0) / 1000
    upper = hi < np.minimum(reach[i, ptu - 1], cap[i]) - 1e-9
    nl, nu = int(lower.sum()), int(upper.sum())
    out = (np.concatenate([i[lower], i[upper]]).astype(np.int64),
           np.concatenate([ptu[lower], ptu[upper]]).astype(np.int64),
           np.concatenate([lo[lower], np.full(nu, -INF)]),
           np.concatenate([np.full(nl, INF), hi[upper]]),
           np.concatenate([w_lo[lower], lay.weight[i[upper]]]).astype(float))
    return out, folded


_BANNER_LOCK = threading.Lock()
_banner_shown = False


def silence_highs_banner() -> None:
    """Make the process's first HiGHS instance with stdout closed off.

    HiGHS prints its banner on file descriptor 1 when the first instance is made; in a live view,
    a log or `--json` output that line is noise or breaks the format. Later instances print
    nothing (output_flag is off).
    """
    global _banner_shown
    with _BANNER_LOCK:
        if _banner_shown:
            return
        _banner_shown = True
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError):  # no real stdout: nothing to protect
            highspy.Highs()
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(devnull)
            os.close(saved)


class BuiltLp:
    """The LP relaxation as built (`build_lp`), with its keys; as HiGHS takes it (`model`,
    made on first use: 1.1 s at 5000 EVs) and as numpy arrays (`shape`)."""

    def __init__(self, arrays: _LpArrays, index: LpIndex, build_s: float = 0.0) -> None:
        self.arrays = arrays
        self.index = index
        self.col_key, self.row_key = arrays.keys()
        self.build_s = build_s
        self._model: highspy.HighsLp | None = None
        self._shape: LpShape | None = None

    @classmethod
    def of(cls, lay: Layout) -> BuiltLp:
        t0 = time.perf_counter()
        arrays, index = build_lp(lay)
        built = cls(arrays, index)
        built.build_s = time.perf_counter() - t0
        return built

    @property
    def model(self) -> highspy.HighsLp:
        if self._model is None:
            self._model = self.arrays.to_highs()
        return self._model

    @property
    def shape(self) -> LpShape:
        """The LP as flat numpy arrays (no round trip through HiGHS's model: 0.74 s at 5000 EVs)."""
        if self._shape is None:
            a = self.arrays

            def cat(parts: list[np.ndarray], dtype: type = float) -> np.ndarray:
                return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

            val = cat(a.a_val)
            self._shape = LpShape(cat(a.col_cost), cat(a.col_lb), cat(a.col_ub), cat(a.row_lb),
                                  cat(a.row_ub), cat(a.a_row, np.int64), cat(a.a_col, np.int64), val)
        return self._shape


def solve_lp(lay: Layout, time_limit_s: float = 10.0, threads: int = 1,
             memory: LpMemory | None = None, built: BuiltLp | None = None,
             price_bound: bool = True) -> LpResult:
    """Solve the LP relaxation; the bound is None when HiGHS did not prove optimality.

    With a `memory`, HiGHS starts from the basis the last replan's LP ended with and the
    basis this one ends with (optimal or not) is kept for the next. `built`: the LP, when
    already built. `price_bound`: an LP not solved gets a bound from row prices
    (`dual_bound_eur`; 0.26 s at 2000 EVs), unless the caller has a better one.
    """
    t0 = time.perf_counter()
    turn = memory.claim() if memory is not None else None
    built = BuiltLp.of(lay) if built is None else built
    model, index, col_key, row_key = built.model, built.index, built.col_key, built.row_key
    start = memory.basis_for(col_key, row_key, model) if memory is not None else None
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    silence_highs_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(float(time_limit_s), 0.01))
    h.setOptionValue("threads", max(int(threads), 1))
    h.setOptionValue("presolve", "off")  # measured: presolve finds little here and costs time
    h.passModel(model)
    warm = start is not None and h.setBasis(start) == highspy.HighsStatus.kOk
    h.run()
    status = h.getModelStatus()
    solve_s = time.perf_counter() - t1
    iterations = int(h.getInfo().simplex_iteration_count)
    if memory is not None:
        memory.remember(col_key, row_key, h, model, turn)
    if status != highspy.HighsModelStatus.kOptimal:
        if memory is not None and turn is not None and status == highspy.HighsModelStatus.kTimeLimit:
            memory.unfinished = (h, col_key, row_key, model, turn)  # `LpMemory.finish` goes on
        return LpResult(h.modelStatusToString(status), None, None, build_s=build_s, solve_s=solve_s,
                        warm=warm, iterations=iterations, index=index, model=model,
                        dual_bound_eur=_bound_unsolved(h, model, row_key, memory)
                        if price_bound else None, built=built)
    solution = h.getSolution()
    if memory is not None and solution.dual_valid and len(solution.row_dual) == len(row_key):
        memory.keep_prices(row_key, np.asarray(solution.row_dual))
    x = np.asarray(solution.col_value)
    bound = float(h.getInfo().objective_function_value)
    disp = _dispatch_from_x(lay, index, x)
    res = LpResult("OPTIMAL", bound, disp, build_s=build_s, solve_s=solve_s, highs=h, index=index,
                   warm=warm, iterations=iterations, model=model)
    res.built = built
    res.mode_weight = [np.clip(x[on], 0, 1) for on in index.mode_on]
    res.profile_weight = [np.clip(x[on], 0, 1) for on in index.profile_on]
    return res


def _bound_unsolved(h: highspy.Highs, model: highspy.HighsLp, row_key: np.ndarray,
                    memory: LpMemory | None) -> float | None:
    """A lower bound on an LP HiGHS did not solve (`dual_bound`): the better of the row
    prices HiGHS has now (its dual simplex iterate) and the last replan's (laid on by key).
    The prices that gave it are kept for the next replan. None when neither gives one."""
    shape = LpShape.of(model)
    lb, ub = implied_boxes(shape)
    tries: list[tuple[float, np.ndarray]] = []
    solution = h.getSolution()
    if solution.dual_valid and len(solution.row_dual) == len(row_key):
        y = np.asarray(solution.row_dual, dtype=float)
        tries.append((dual_bound(shape, y, lb, ub), y))
    kept = memory.prices_for(row_key) if memory is not None else None
    if kept is not None:
        tries.append((dual_bound(shape, kept, lb, ub), kept))
    tries = [t for t in tries if np.isfinite(t[0])]
    if not tries:
        return None
    best, price = max(tries, key=lambda t: t[0])
    if memory is not None:
        memory.keep_prices(row_key, price)
    return best


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.zeros(idx.shape)
    m = idx >= 0
    out[m] = x[idx[m]] * 1000
    return out


def _dispatch_from_x(lay: Layout, index: LpIndex, x: np.ndarray) -> Dispatch:
    disp = Dispatch(np.maximum(_take(x, index.charge), 0), np.maximum(_take(x, index.discharge), 0),
                    np.maximum(_take(x, index.curtail), 0))
    powers = []
    for on, q in zip(index.mode_on, index.mode_power, strict=True):
        disp.mode_index.append(np.argmax(x[on], axis=1))
        powers.append(x[q].sum(axis=1) * 1000)
    disp.mode_power = np.array(powers).reshape(len(powers), lay.n)
    for on, starts, alts in zip(index.profile_on, index.profile_starts, index.profile_alts,
                                strict=True):
        best = int(np.argmax(x[on]))
        disp.profile_start.append(int(starts[best]))
        disp.profile_choice.append(int(alts[best]))
    return disp


def polish(lay: Layout, lp: LpResult, disp: Dispatch,
           time_limit_s: float | None = None) -> Dispatch | None:
    """Re-solve the LP with every on/off choice of `disp` fixed, powers free within the domain.

    A charging PTU stays in [min, max], an idle one at 0, modes and profile starts as chosen:
    the LP then re-balances the powers around the peak, the fuse and the prices. Its solution
    keeps the integer pattern of `disp`, so it is a plan (after snapping to the power steps).
    Warm-started from the relaxation's basis; None if HiGHS does not finish (within
    `time_limit_s`, when given).
    """
    h, index = lp.highs, lp.index
    if h is None or index is None:
        return None
    cols: list[np.ndarray] = []
    lows: list[np.ndarray] = []
    ups: list[np.ndarray] = []
    c_on = disp.charge > 0
    d_on = disp.discharge > 0
    for idx, on, lo, hi, other_on in ((index.charge, c_on, lay.cmin, lay.cmax, d_on),
                                      (index.discharge, d_on, lay.dmin, lay.dmax, c_on)):
        m = idx >= 0
        if not np.any(m):
            continue
        ii, tt = np.nonzero(m)
        on_v = on[ii, tt]
        free = (lo[ii] <= 0) & ~other_on[ii, tt]  # no minimum: may still change (batteries)
        cols.append(idx[ii, tt])
        lows.append(np.where(on_v, lo[ii], 0.0) / 1000)
        ups.append(np.where(on_v | free, hi[ii], 0.0) / 1000)
    for on, k in zip(index.mode_on, disp.mode_index, strict=True):
        chosen = np.zeros(on.shape, dtype=bool)
        chosen[np.arange(on.shape[0]), k] = True
        cols.append(on.ravel())
        lows.append(chosen.ravel().astype(float))
        ups.append(chosen.ravel().astype(float))
    for j, (on, starts, alts) in enumerate(zip(index.profile_on, index.profile_starts,
                                               index.profile_alts, strict=True)):
        choice = disp.profile_choice[j] if j < len(disp.profile_choice) else 0
        chosen = ((starts == disp.profile_start[j]) & (alts == choice)).astype(float)
        cols.append(on)
        lows.append(chosen)
        ups.append(chosen)
    if not cols:
        return None
    c = np.concatenate(cols).astype(np.int32)
    h.changeColsBounds(len(c), c, np.concatenate(lows), np.concatenate(ups))
    # HiGHS counts its time limit from the instance's first run, not per run: without a new
    # one the polish inherited what the relaxation had left of its own (often nothing)
    h.setOptionValue("time_limit", INF if time_limit_s is None
                     else h.getRunTime() + max(float(time_limit_s), 0.01))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = np.asarray(h.getSolution().col_value)
    return _dispatch_from_x(lay, index, x)
