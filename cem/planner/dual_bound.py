"""A lower bound on the LP relaxation from any row prices, without the LP finishing.

Lagrangian relaxation of every row: for prices y (one per row) the LP's optimum is at least

    L(y) = sum_i min(y_i * row_lower_i, y_i * row_upper_i) + sum_j min over [lb_j, ub_j] of d_j x_j,

with d = c - A^T y the reduced costs: every column on its own then takes the cheaper end of
its box, which numpy does for all columns at once. Any y gives a valid bound (a row price of
the wrong sign for a one-sided row is set to 0); good prices (the last replan's LP duals, or
the duals HiGHS's dual simplex has when its time runs out) give a bound near the optimum.
Everything the LP holds (batteries, PV, modes, profiles, kW-max, milestones, the site rows)
is covered, since nothing is split by hand: the relaxation is of the LP as built.

For the sum to be finite every column needs a finite box. `implied_boxes` gives each one
that keeps at least one optimal solution of the LP: bounds implied by the rows and the other
columns' boxes (the group sums, the grid, the storage levels), and for a column with a
non-negative cost that only ever helps the rows it is in (an unmet-energy or milestone miss,
the import above the export price, the kW-max peak), the most it could be needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import highspy
import numpy as np

INF = highspy.kHighsInf
_SLACK = 1e-7  # relative room on every implied bound, for rounding


@dataclass
class LpShape:
    """A HiGHS LP as flat arrays: costs, boxes, row bounds and its nonzeros (row, col, val)."""

    cost: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    row: np.ndarray
    col: np.ndarray
    val: np.ndarray

    @classmethod
    def of(cls, model: highspy.HighsLp) -> LpShape:
        start = np.asarray(model.a_matrix_.start_, dtype=np.int64)
        n_cols = int(model.num_col_)
        col = np.repeat(np.arange(n_cols, dtype=np.int64), np.diff(start[:n_cols + 1]))
        return cls(np.asarray(model.col_cost_, dtype=float), np.asarray(model.col_lower_, dtype=float),
                   np.asarray(model.col_upper_, dtype=float), np.asarray(model.row_lower_, dtype=float),
                   np.asarray(model.row_upper_, dtype=float),
                   np.asarray(model.a_matrix_.index_, dtype=np.int64), col,
                   np.asarray(model.a_matrix_.value_, dtype=float))

    @property
    def n_rows(self) -> int:
        return len(self.row_lower)

    @property
    def n_cols(self) -> int:
        return len(self.cost)


def _activity(shape: LpShape, lb: np.ndarray, ub: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per nonzero, its least and largest contribution; per row, the finite sums of those
    and how many are infinite."""
    a = shape.val
    lo_x, hi_x = lb[shape.col], ub[shape.col]
    c_min = np.where(a > 0, a * lo_x, a * hi_x)
    c_max = np.where(a > 0, a * hi_x, a * lo_x)
    inf_min = ~np.isfinite(c_min) | (np.abs(c_min) >= INF)
    inf_max = ~np.isfinite(c_max) | (np.abs(c_max) >= INF)
    m = shape.n_rows
    s_min = np.bincount(shape.row, np.where(inf_min, 0.0, c_min), minlength=m)
    s_max = np.bincount(shape.row, np.where(inf_max, 0.0, c_max), minlength=m)
    n_min = np.bincount(shape.row, inf_min, minlength=m)
    n_max = np.bincount(shape.row, inf_max, minlength=m)
    return c_min, c_max, s_min, s_max, n_min, n_max


def _rest(c: np.ndarray, s: np.ndarray, n: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Per nonzero, the row's sum of the other nonzeros' contributions (inf: unbounded)."""
    inf_here = ~np.isfinite(c) | (np.abs(c) >= INF)
    others_inf = n[row] - inf_here.astype(np.int64)
    rest = s[row] - np.where(inf_here, 0.0, c)
    return np.where(others_inf > 0, np.nan, rest)


def implied_boxes(shape: LpShape, passes: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Finite column boxes that keep at least one optimal solution of the LP.

    Bound propagation (what a row and the other columns' boxes allow) until no infinite
    bound becomes finite, then for a column with a cost >= 0 whose every row it only helps
    when it grows (a >= row with a positive coefficient, a <= row with a negative one), the
    most any row could need of it: more is never cheaper. Left infinite where neither
    applies (`dual_bound` then returns -inf for a price that leans on that side)."""
    lb, ub = shape.col_lower.copy(), shape.col_upper.copy()
    a, rl, ru = shape.val, shape.row_lower[shape.row], shape.row_upper[shape.row]
    for step in range(passes):
        c_min, c_max, s_min, s_max, n_min, n_max = _activity(shape, lb, ub)
        rest_min = _rest(c_min, s_min, n_min, shape.row)
        rest_max = _rest(c_max, s_max, n_max, shape.row)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            from_ru = np.where(ru < INF, (ru - rest_min) / a, np.nan)  # a x <= ru - rest_min
            from_rl = np.where(rl > -INF, (rl - rest_max) / a, np.nan)  # a x >= rl - rest_max
        up = np.where(a > 0, from_ru, from_rl)
        down = np.where(a > 0, from_rl, from_ru)
        new_ub = np.full(shape.n_cols, INF)
        new_lb = np.full(shape.n_cols, -INF)
        ok = np.isfinite(up)
        np.minimum.at(new_ub, shape.col[ok], up[ok] + _SLACK * (1 + np.abs(up[ok])))
        ok = np.isfinite(down)
        np.maximum.at(new_lb, shape.col[ok], down[ok] - _SLACK * (1 + np.abs(down[ok])))
        opened = (ub >= INF) & (new_ub < INF) | (lb <= -INF) & (new_lb > -INF)
        # only infinite bounds are replaced: a finite one tightened helps little and costs passes
        ub = np.where(ub >= INF, new_ub, ub)
        lb = np.where(lb <= -INF, new_lb, lb)
        if not opened.any() and step > 0:
            break
    # dominated columns: growing only helps every row they are in
    helps = np.where(a > 0, ru >= INF, rl <= -INF)
    hurts_col = np.bincount(shape.col, ~helps, minlength=shape.n_cols) > 0
    cand = (ub >= INF) & (shape.cost >= 0) & ~hurts_col & (lb > -INF)
    if cand.any():
        c_min, c_max, s_min, s_max, n_min, n_max = _activity(shape, lb, ub)
        rest_min = _rest(c_min, s_min, n_min, shape.row)
        rest_max = _rest(c_max, s_max, n_max, shape.row)
        with np.errstate(invalid="ignore", divide="ignore"):
            need = np.where(a > 0, (rl - rest_min) / a, (ru - rest_max) / a)
        sel = cand[shape.col]
        most = np.full(shape.n_cols, -INF)
        unknown = np.zeros(shape.n_cols, dtype=bool)
        bad = sel & ~np.isfinite(need)
        unknown[shape.col[bad]] = True
        good = sel & np.isfinite(need)
        np.maximum.at(most, shape.col[good], need[good])
        fix = cand & ~unknown
        top = np.maximum(most, lb)
        ub = np.where(fix, top + _SLACK * (1 + np.abs(top)), ub)
    return lb, ub


def dual_bound(shape: LpShape, row_price: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> float:
    """L(y) for these row prices (HiGHS's sign: reduced cost = c - A^T y) over the boxes
    [lb, ub]: a lower bound on the LP's optimum (-inf when a box side it needs is infinite)."""
    y = np.asarray(row_price, dtype=float).copy()
    y[(y > 0) & (shape.row_lower <= -INF)] = 0.0  # a price that would pay for an open side
    y[(y < 0) & (shape.row_upper >= INF)] = 0.0
    d = shape.cost - np.bincount(shape.col, shape.val * y[shape.row], minlength=shape.n_cols)
    with np.errstate(invalid="ignore"):
        rows = np.where(y > 0, y * shape.row_lower, np.where(y < 0, y * shape.row_upper, 0.0))
        cols = np.where(d > 0, d * lb, np.where(d < 0, d * ub, 0.0))
    if np.any(np.abs(rows) >= INF) or np.any(np.abs(cols) >= INF) \
            or not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        return -np.inf
    # summed in order of size, for rounding
    return float(np.sum(np.sort(np.concatenate([rows, cols]))))
