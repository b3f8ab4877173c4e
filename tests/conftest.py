"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Modules whose tests keep the cores busy for long (the planner, with 2 CP-SAT workers, over
# simulated days; `cem demo` against the wall clock; the live replan benches). Their tests get
# the `one_core` marker: `make test` runs every other module in two pytest-xdist workers
# (`-n 2 --dist loadscope -m "not one_core"`: they mostly wait on sockets and timers), then
# these one after another in one process (`-m one_core`), as before, so a timed demo never
# runs beside a week of planning. With `-n 2 --dist loadscope` and no `-m`, each module stays
# whole in one worker (its module fixtures run once) and these modules share one worker.
ONE_CORE = frozenset({
    "test_simulate_week.py", "test_simulate_cli.py", "test_simulate_honest_twin.py",
    "test_twin_level5.py", "test_bench_replan.py", "test_bench_faults.py", "test_demo_run.py"})


class OneCoreScopes:
    """With `--dist loadscope`: one scope per module, one for all the `ONE_CORE` modules.

    (xdist's own `--dist loadgroup` does not group on pytest 9: it renames `item._nodeid`,
    which pytest 9 no longer reads.)"""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        from xdist.scheduler import LoadScopeScheduling

        if config.getoption("dist") != "loadscope":
            return None

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                return "one_core" if module.rsplit("/", 1)[-1] in ONE_CORE else module

        return Scheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_core: a long CPU-bound module (tests/conftest.py)")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(OneCoreScopes(), "one_core_scopes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ONE_CORE:
            item.add_marker(pytest.mark.one_core)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key (PEM) for 127.0.0.1, for wss servers."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key
