"""Installable like a product: a wheel, installed into a fresh virtual environment and run
outside the checkout, has its example sites, register maps and demo data, and runs the demo.

The fresh environment gets the project's dependencies from this test run's environment (a
`.pth` line: no network here); the project itself only from the wheel, and the working
directory is a temporary folder, so nothing of the source tree can be picked up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_a_wheel_in_a_fresh_venv_runs_the_demo_and_a_starter_site(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: setuptools builds in the tree (build/)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "tests", "__pycache__", ".*_cache",
        ".hypothesis", "*.db", "*.db-*", "*.lock", "demo-report", "report"))
    dist = tmp_path / "dist"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source,
                cwd=tmp_path, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    noise = [line for line in (built.stdout + built.stderr).splitlines()
             if "deprecat" in line.lower() or "BuildBackendWarning" in line]
    assert not noise, noise  # no deprecation warnings when building / installing
    wheel = next(dist.glob("s2_cem-*.whl"))

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp_path).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel,
                    cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cem = venv / "bin" / "cem"
    where = run(python, "-c", "import cem; print(cem.__file__)", cwd=elsewhere)
    assert where.stdout.strip().startswith(str(purelib))  # the wheel's, not the checkout's
    version = run(cem, "--version", cwd=elsewhere)
    assert version.returncode == 0 and version.stdout.startswith("cem 0.1.0")

    demo = run(cem, "demo", "--duration", "5", "--report", "report", cwd=elsewhere)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Traceback" not in demo.stdout + demo.stderr
    summary = json.loads((elsewhere / "report" / "summary.json").read_text())
    assert summary  # measured on the simulated site
    log = (elsewhere / "report" / "demo.log").read_text()
    assert "OCPP central system listening" in log and "battery" in log

    init = run(cem, "init", "site", cwd=elsewhere)
    assert init.returncode == 0, init.stdout + init.stderr
    check = run(cem, "config", "check", "site/site.toml", cwd=elsewhere)
    assert check.returncode == 0, check.stdout + check.stderr
    text = (elsewhere / "site" / "site.toml").read_text()
    maps = [line.split('"')[1] for line in text.splitlines() if "map = " in line]
    assert maps and all(m.startswith(str(purelib)) and Path(m).exists() for m in maps)
