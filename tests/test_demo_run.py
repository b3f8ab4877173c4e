"""`cem demo` as a user runs it: a subprocess, real protocols on loopback, a report at the end."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOML = ROOT / "specs" / "sites" / "demo.toml"


def _demo(report: Path, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from cem.app.cli import app; app()", "demo", "--config",
         str(DEMO_TOML), "--report", str(report), *options],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_demo_runs_the_whole_site_within_its_limits(tmp_path: Path) -> None:
    report = tmp_path / "report"
    # 06:00 to 18:00 (the morning EVs have left by then) at 720x, half the demo's default: at
    # 1440x a wall second is 24 simulated minutes, and how late a replan or a guard sample
    # lands in simulated time depends on what else the machine runs; this test is about the
    # control, so it gives the loop half that lag (`make demo` itself runs at 1440x)
    proc = _demo(report, "--duration", "60", "--speed", "720")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err + out
    assert "Traceback" not in err + out
    assert "site" in out and "plan:" in out  # plain progress lines (stdout is not a terminal)
    for name in ("power.png", "phase_current.png", "summary.md", "summary.json",
                 "charging_profiles.csv"):
        assert (report / name).stat().st_size > 0, name
    summary = json.loads((report / "summary.json").read_text())
    # every RM connected: 8 EVSEs (OCPP 1.6 and 2.0.1) + battery, heat pump, PV, meter
    assert summary["rms_connected"] == summary["rms_expected"] == 12
    assert summary["replans"] >= 1 and summary["ev_charged"] >= 4
    assert summary["simulated_h"] > 11

    with sqlite3.connect(report / "cem-demo.db") as db:
        plans = db.execute("SELECT COUNT(*) FROM plans").fetchone()[0]
        sent = db.execute("SELECT COUNT(*) FROM instructions WHERE message_type = "
                          "'FRBC.Instruction' AND reception_status = 'OK'").fetchone()[0]
    assert plans >= 1 and sent >= 1

    # every current limit a charger received fits its EVSE and the site fuse
    with (report / "charging_profiles.csv").open() as handle:
        profiles = list(csv.DictReader(handle))
    tx = [p for p in profiles if p["purpose"] == "TxProfile"]
    assert tx, "the CEM never limited an EV"
    for profile in profiles:
        limit = float(profile["limit"])
        if profile["unit"] == "A":
            assert limit <= float(profile["max_current_a"]) + 0.01
            assert limit <= summary["fuse_a"]
    # measured on the simulated meter: no settled 15-minute average above the GTV or the
    # congestion limit (the contract is settled on them). The summary reports any sample
    # above the fuse. At 720x one wall second is 12 simulated minutes: a plan is made on a
    # snapshot the devices have moved on from by simulated minutes (a heat pump switched on
    # meanwhile), and the guard, reading the meter every 0.05 s, caps within a sample or two.
    # Most runs stay under the fuse; in about one in ten a phase went 1-8 % over for 1-3
    # simulated minutes. A fuse carries 10 % over for far longer than that (IEC 60898-1: no
    # trip within an hour at 1.13 x In); more, or longer, is a failure.
    assert summary["fuse_never_exceeded"] == (summary["max_phase_a"] <= summary["fuse_a"])
    assert summary["limits_never_exceeded"] == (summary["ptus_over_limit"] == 0)
    assert summary["ptus_over_limit"] == 0, summary
    assert summary["max_phase_a"] <= 1.10 * summary["fuse_a"], \
        summary["highest_phase_current_at"]
    assert summary["minutes_over_fuse"] <= 5, summary["highest_phase_current_at"]
    # every EV that left got its target, or the summary says truly why not: it left before
    # the departure the CEM knew, the EV took less than offered, its stay was too short even
    # at full power, or the CEM missed it. At 720x a replan takes minutes of simulated time:
    # an EV whose last PTUs are tight can miss by a few hundred Wh. At most two such misses,
    # by at most 10 % (0.2 kWh for a small target: a minute at 11 kW, 0.08 s of wall time),
    # said as such with their figures. An EV that left early with its target counts as met.
    assert summary["ev_left"] >= 5
    assert summary["ev_missed"] <= 2, summary["ev_missed_by_cem"]
    assert summary["ev_targets_met"] + summary["ev_left_early"] \
        + summary["ev_ev_limited"] + summary["ev_stay_limited"] + summary["ev_site_limited"] \
        + summary["ev_missed"] \
        == summary["ev_left"]
    with (report / "ev_visits.csv").open() as handle:
        visits = [v for v in csv.DictReader(handle) if v["left"] == "True" and v["ocpp"]]
    assert len(visits) == summary["ev_left"]
    assert sum(v["outcome"] == "met" for v in visits) == summary["ev_targets_met"]
    for visit in visits:
        assert visit["outcome"] in ("met", "left-early", "ev-limited", "stay-limited", "site-limited",
                                    "missed"), visit
        assert (visit["outcome"] == "met") == (visit["reason"] == ""), visit
        if visit["outcome"] == "missed":
            shortfall = float(visit["target_kwh"]) - float(visit["delivered_kwh"])
            assert shortfall <= max(0.1 * float(visit["target_kwh"]), 0.2), visit
            assert any(line.startswith(visit["ev"] + ": offered")
                       for line in summary["ev_missed_by_cem"]), summary["ev_missed_by_cem"]


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = _demo(report, "--duration", "120")
    assert proc.stdout is not None
    began = time.monotonic()
    lines = []
    while time.monotonic() - began < 40:  # wait until CP-SAT has planned (it used to take
        line = proc.stdout.readline()     # SIGINT over and leave it at SIG_DFL afterwards)
        lines.append(line)
        if "plan: feasible" in line or "plan: optimal" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err + out
    assert "Traceback" not in err + out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT received"
    log = (report / "demo.log").read_text()
    assert "ending S2 session: demo ended: SIGINT received" in log
    assert "store flushed and closed" in log


def test_the_live_view_runs_in_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    controller, terminal = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "30", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cem.app.cli import app; app()", "demo", "--config",
         str(DEMO_TOML), "--report", str(tmp_path / "report"), "--duration", "6"],
        cwd=ROOT, stdout=terminal, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the demo ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    text = shown.decode("utf-8", "replace")
    assert "EVSE" in text and "kWh of target" in text  # the live EV table
    assert "FRBC" in text and "PEBC" in text  # RMs with their control types
    assert "demo summary" in text
