"""`cem bench s2`: a baseline CEM from another checkout beside this one, in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_baseline_checkout_runs_beside_this_one_and_both_are_reported() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--messages", "6", "--rate", "100", "--cem-src", str(ROOT),
                          "--busy-core", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["baseline_src"] == str(ROOT) and report["busy_core"] is True
    (baseline,), (this,) = report["baseline"], report["this"]
    assert baseline["cem_src"] == str(ROOT) and this["cem_src"] is None
    for result in (baseline, this):
        assert result["messages_acknowledged"] == 30 and result["not_ok"] == 0
        assert result["cem_exit_code"] == 0 and not result["errors"]
        assert result["busy_core"] is True
        assert 0 <= result["cem_cpu_system_us_per_message"] <= result["cem_cpu_us_per_message"]
        assert result["cem_kb_per_rm"] is not None
        assert result["cem_kb_per_rm_connected"] is not None
    medians = report["median"]
    assert medians["this"]["cem_cpu_us_per_message"] == this["cem_cpu_us_per_message"]
    # 30 messages may take less CPU than one clock tick (10 ms): then there is no ratio
    if baseline["cem_cpu_us_per_message"] and this["cem_cpu_us_per_message"]:
        assert report["cpu_per_message_ratio"] == round(
            this["cem_cpu_us_per_message"] / baseline["cem_cpu_us_per_message"], 3)
    else:
        assert report["cpu_per_message_ratio"] is None


def test_the_latency_and_the_cems_cpu_are_reported_for_every_second_of_the_message_phase(
) -> None:
    # 5 RMs x 12 at 20/s: measurements sent through 3 seconds, a busy core beside the CEM
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--messages", "12", "--rate", "20", "--busy-core", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["messages_acknowledged"] == 60 and not result["errors"]
    by_second = result["latency_p99_ms_by_second"]
    assert len(by_second) >= 3 and all(p is not None for p in by_second[:3])
    assert all(0 < p <= result["latency_max_ms"] for p in by_second if p is not None)
    assert max(p for p in by_second if p is not None) >= result["latency_p99_ms"] * 0.5
    shares = result["cem_cpu_share_by_second"]
    assert len(shares) >= 3 and all(share >= 0 for share in shares)
    assert 0 < result["busy_core_cpu_share"] <= 1.05


def test_the_cems_read_batch_is_set_for_the_run_and_reported() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--messages", "6", "--rate", "100", "--read-batch-ms", "5",
                          "--json"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["read_batch_ms"] == 5
    assert result["messages_acknowledged"] == 30 and result["not_ok"] == 0
    assert result["cem_exit_code"] == 0 and not result["errors"]
    # a batch the CEM refuses (above 50 ms) is the bench's usage error, not a CEM that fails
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--read-batch-ms", "80"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_a_baseline_that_is_no_checkout_is_a_user_mistake(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--cem-src", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert "not a checkout of this project" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_soak_keeps_the_rms_sending_for_its_duration_and_samples_the_cems_memory() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--rate", "50", "--duration", "4", "--sample-every", "0.5",
                          "--measurement-log-interval", "0", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["soak_s"] == 4 and result["cem_exit_code"] == 0 and not result["errors"]
    # paced at 50/s for 4 s over 5 RMs: about 200 measurements, every one acknowledged OK
    assert 150 <= result["messages_sent"] <= 200
    assert result["messages_acknowledged"] == result["messages_sent"]
    assert result["not_ok"] == 0
    assert result["stored_messages"] >= result["messages_sent"]   # every one logged (0)
    series = result["rss_series"]
    assert len(series) >= 5 and all(mb > 0 for _, mb in series)
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    assert isinstance(result["rss_growth_kb_per_rm"], float)
    assert isinstance(result["rss_growth_kb_per_min"], float)


def test_a_soak_of_no_time_is_a_user_mistake() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--duration", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--duration" in run.stderr and "Traceback" not in run.stderr


def test_the_floor_server_answers_every_message_beside_the_cem_and_its_cost_is_taken_off() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--messages", "6", "--rate", "100", "--floor", "--json"],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "CEM_EVENT_LOOP": "uvloop"})
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["event_loop"] == "uvloop"
    (floor,), (cem,) = report["floor"], report["cem"]
    assert floor["floor"] is True and cem["floor"] is False
    for result in (floor, cem):   # the same clients: full handshake, every measurement OK
        assert result["rms_connected"] == 5 and not result["errors"]
        assert result["messages_acknowledged"] == 30 and result["not_ok"] == 0
        assert result["cem_exit_code"] == 0 and result["event_loop"] == "uvloop"
    assert floor["stored_messages"] is None   # it only answers
    assert cem["stored_messages"] >= 30
    assert report["cem_cpu_us_over_floor"] == round(
        cem["cem_cpu_us_per_message"] - floor["cem_cpu_us_per_message"], 1)


def test_a_floor_beside_a_baseline_checkout_is_a_user_mistake() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "5",
                          "--floor", "--cem-src", str(ROOT)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert "--floor" in run.stderr and "Traceback" not in run.stderr
