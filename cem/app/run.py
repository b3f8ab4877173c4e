"""`cem run`: the whole site as one supervised process.

The parts (`cem.app.parts`): the CEM core (store, S2 server, control loop), its grid-signal
sources, S2 Connect, the OCPP central system (`[ocpp]`) and one Modbus RM per
`[[modbus.devices]]`; `--only cem|ocpp|modbus` runs one group alone (the RMs on another host
than the CEM). `cem.app.supervisor` binds them all (database locks, ports) before it starts
any, restarts a part that dies with back-off and records their states for `cem status`.

Logs in one format (`sitekit.logs`); SIGINT/SIGTERM stop every part cleanly. Exit code 0 on a
clean stop, 2 with a one-line message (no traceback) for problems an operator can fix (address
in use, the store in use by another process, unreadable TLS files, a store written by a newer
CEM), 1 when the core failed while running (the init system restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from cem import __version__
from cem.app.parts import site_parts
from cem.app.service import (
    ServiceError,
    default_controller_factory,
    event_loop_factory,
    raise_open_file_limit,
    run_on_event_loop,
    tenure_long_lived,
    tune_garbage_collector,
)
from cem.app.site_file import SiteFile
from cem.app.supervisor import PartBook, StartFailed, Supervisor
from sitekit import logs

logger = logging.getLogger("cem")


async def supervise_until_signal(supervisor: Supervisor) -> int:
    """Start the parts, run until SIGINT/SIGTERM (0) or until a critical part fails (1), then
    stop every part cleanly. Raises StartFailed when a part cannot bind or start."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        if received:
            logger.warning("second %s: stopping harder", name)
        received.append(name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await supervisor.start()
        tenure = asyncio.create_task(tenure_long_lived(stop), name="cem-gc-tenure")
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(supervisor.fatal.wait())]
        code = 0
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                logger.info("%s received: shutting down", received[0] if received else "stop")
            else:
                logger.error("shutting down: %s", supervisor.fatal_reason)
                code = 1
        finally:
            for task in (*waiters, tenure):
                task.cancel()
            await asyncio.gather(*waiters, tenure, return_exceptions=True)
            await supervisor.stop()
        return code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)


def run_service(config: SiteFile, log_level: str = "INFO", *, log_format: str = "text",
                only: str | None = None, cem_url: str | None = None,
                token: str | None = None) -> int:
    """Run the site's parts until SIGINT/SIGTERM: 0 on a clean stop, 2 on an operator-fixable
    problem (printed as one line, no traceback), 1 when the core failed while running."""
    if log_level.upper() not in logs.LEVELS or log_format not in logs.FORMATS:
        print(f"error: --log-level {log_level!r} / --log-format {log_format!r}: use "
              f"{', '.join(logs.LEVELS)} / {' or '.join(logs.FORMATS)}", file=sys.stderr)
        return 2
    try:
        parts = site_parts(config, only=only, cem_url=cem_url, token=token,
                           controller_factory=default_controller_factory())
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure(log_level, log_format)
    logging.getLogger("pymodbus").setLevel(logging.ERROR)  # the RMs log their own retries
    limit = raise_open_file_limit()
    if limit < 2048:
        logger.warning("open-file limit is %d: at most about %d RMs can connect "
                       "(raise it with ulimit -n)", limit, limit - 100)
    core = any(part.kind == "cem" for part in parts)
    supervisor = Supervisor(parts, book=PartBook(config.store.path) if core else None)
    factory = event_loop_factory()
    logger.info("cem %s: running %s on %s", __version__, ", ".join(p.name for p in parts),
                "uvloop" if factory is not None else "asyncio's event loop")
    tune_garbage_collector()
    try:
        code = run_on_event_loop(supervise_until_signal(supervisor), factory)
    except StartFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    logger.info("S2 CEM stopped" if core else "stopped")
    return code
