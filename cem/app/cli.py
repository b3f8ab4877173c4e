"""The `cem` command line: run a site, check its config, plan, simulate and benchmark.

Each command is a thin shell: it parses options, turns user mistakes into a clear message and
exit code 2 (never a traceback), and calls into the package that does the work. Heavy imports
happen inside the commands so `cem --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from cem.app.common import console, fail, load_config_or_exit
from cem.app.site_file import SiteFile
from resource_managers.modbus.config import ModbusDevice
from sitekit.config import ConfigError

app = typer.Typer(
    name="cem",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Site configuration files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print figures (JSON with --json).", no_args_is_help=True)
rm_app = typer.Typer(help="Run a resource manager as its own process.", no_args_is_help=True)
sim_app = typer.Typer(help="Run simulated devices that speak the real protocols.",
                      no_args_is_help=True)
congestion_app = typer.Typer(help="Congestion windows from the grid operator.",
                             no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(rm_app, name="rm")
app.add_typer(sim_app, name="sim")
app.add_typer(congestion_app, name="congestion")
pair_app = typer.Typer(help="S2 Connect pairing: codes, paired RMs, discovery.",
                       no_args_is_help=True)
app.add_typer(pair_app, name="pair")
openadr_app = typer.Typer(help="The OpenADR 3 VEN (grid operator limits).", no_args_is_help=True)
app.add_typer(openadr_app, name="openadr")

DEMO_CONFIG = Path("specs/sites/demo.toml")


# --- configuration ---------------------------------------------------------------------------


def load_site_or_exit(file: Path, *, needs_grid: bool = True) -> SiteFile:
    """A site file `cem run` can run (and `cem config check` passes): valid, its files there,
    safe together, with a `[grid]` section; else every problem printed and exit 2."""
    config = load_config_or_exit(file)
    from cem.app.config_checks import check_site_semantics, missing_grid

    problems = ([*missing_grid(config, file)] if needs_grid else []) + check_site_semantics(config)
    if problems:
        console.print(ConfigError(file, problems).report(), markup=False, highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2)
    return config


def _version(value: bool) -> None:
    if value:
        from cem.app.packaged import version

        Console().print(f"cem {version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """S2 Customer Energy Manager: plans a whole site and steers its devices over S2."""


@config_app.command("check")
def config_check(file: Path = typer.Argument(..., help="site config TOML file")) -> None:
    """Validate a site config file and print every problem with its place and a hint."""
    config = load_site_or_exit(file)
    out = Console()
    out.print(f"[green]ok[/] {file}: site '{config.site.name}', "
              f"fuse {config.grid.fuse_a:g} A x {config.grid.phases}, "
              f"GTV {config.grid.import_limit_kw:g} kW, "
              f"S2 on {config.server.host}:{config.server.port}"
              f"{' (wss)' if config.server.tls_cert else ''}, "
              f"{len(config.server.tokens)} RM token(s), "
              f"{len(config.charge_cards)} charge card(s), "
              f"{len(config.modbus.devices)} Modbus device(s)", soft_wrap=True)


# --- the CEM ---------------------------------------------------------------------------------


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site file (TOML; `cem init DIR` writes one)"),
    only: str | None = typer.Option(None, "--only", help="run one part alone: cem, ocpp or "
                                    "modbus (the RMs on another host than the CEM)"),
    cem: str | None = typer.Option(None, "--cem", help="with --only ocpp|modbus: the CEM's S2 "
                                   "URL (default: the file's [server])"),
    token: str | None = typer.Option(None, help="with --only ocpp|modbus: bearer token for "
                                     "the CEM"),
    host: str | None = typer.Option(None, help="override server.host"),
    port: int | None = typer.Option(None, min=0, max=65535, help="override server.port"),
    db: Path | None = typer.Option(None, help="override store.path"),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR"),
    log_format: str = typer.Option("text", help="text, or json (one object per line)"),
) -> None:
    """Run the site: the CEM, its OCPP central system and Modbus RMs, supervised.

    Each part is restarted with back-off when it fails; Ctrl-C / SIGTERM stop cleanly."""
    if config is None:
        fail("cem run needs a site file: --config FILE",
             "`cem init DIR` writes a starter site file to edit (the grid connection above all)")
    if only is not None and only not in ("cem", "ocpp", "modbus"):
        fail(f"--only {only!r}: use cem, ocpp or modbus")
    site = load_site_or_exit(config, needs_grid=only in (None, "cem"))
    if host is not None:
        site.server.host = host
    if port is not None:
        site.server.port = port
    if db is not None:
        site.store.path = db
    if host is not None or port is not None:
        _check_again(config, site)
    from cem.app.run import run_service

    sys.exit(run_service(site, log_level=log_level, log_format=log_format, only=only,
                         cem_url=cem, token=token))


def _check_again(file: Path, site: SiteFile) -> None:
    """After --host / --port: the same checks again (e.g. no tokens on a public address)."""
    from cem.app.config_checks import check_site_semantics

    problems = check_site_semantics(site)
    if problems:
        console.print(ConfigError(file, problems).report() + "\n  (with the --host / --port "
                      "given)", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def status(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="override store.path"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object: running, why, "
                                  "parts, rms, signals"),
) -> None:
    """Whether the CEM runs, how its parts are doing, the RMs it knows.

    Exit code 0: running and healthy; 1: not running (down or stale); 3: a part is failing."""
    site = load_config_or_exit(config)
    from cem.app.status_view import print_status, status_json

    path = db or site.store.path
    code = status_json(path) if json_out else print_status(path)
    raise typer.Exit(code)


@app.command()
def init(
    folder: Path = typer.Argument(..., help="folder for the new site file (created)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing site.toml"),
) -> None:
    """Write a starter site file (DIR/site.toml) that `cem run --config DIR/site.toml` runs."""
    from cem.app.packaged import write_starter

    try:
        written = write_starter(folder, force=force)
    except FileExistsError as exc:
        fail(f"{exc} exists already", "edit it, or pass --force to overwrite it")
    except OSError as exc:
        fail(f"cannot write {folder}: {exc.strerror or exc}")
    Console().print(f"wrote {written}: set [grid] (fuse, GTV) to your connection, then "
                    f"`cem config check {written}` and `cem run --config {written}`",
                    markup=False, highlight=False, soft_wrap=True)


@congestion_app.command("add")
def congestion_add(
    start: str = typer.Option(..., help="ISO 8601 start with offset"),
    end: str = typer.Option(..., help="ISO 8601 end with offset"),
    import_limit_kw: float | None = typer.Option(None, help="import limit in the window, kW"),
    export_limit_kw: float | None = typer.Option(None, help="export limit in the window, kW"),
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="override store.path"),
) -> None:
    """Add a congestion window; a running CEM picks it up and replans."""
    site = load_config_or_exit(config)
    from cem.app.congestion_cli import add_congestion_command

    add_congestion_command(db or site.store.path, start, end, import_limit_kw, export_limit_kw)


@congestion_app.command("list")
def congestion_list(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="override store.path"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON list"),
) -> None:
    """List congestion windows with their source (config, cli, openadr, ...)."""
    site = load_config_or_exit(config)
    from cem.app.congestion_cli import list_congestion_command

    list_congestion_command(site, db or site.store.path, json_out=json_out)


@app.command()
def prices(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="override store.path"),
    date: str | None = typer.Option(None, "--date", help="local day YYYY-MM-DD (default today)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Show per PTU the prices the planner uses: source, day-ahead, import and export."""
    site = load_config_or_exit(config)
    from cem.app.signals_cli import prices_command

    prices_command(site, db or site.store.path, date, json_out)


@openadr_app.command("status")
def openadr_status(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="override store.path"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Show the OpenADR VEN: VTN link, program, last poll, events in force, safe mode."""
    site = load_config_or_exit(config)
    from cem.app.signals_cli import openadr_status_command

    openadr_status_command(site, db or site.store.path, json_out)


# --- S2 Connect pairing ------------------------------------------------------------------------

_CONFIG_OPTION = typer.Option(None, "--config", "-c",
                              help="site config TOML (default: built-in defaults)")
_DB_OPTION = typer.Option(None, help="override store.path")


@pair_app.command("code")
def pair_code(
    static: bool = typer.Option(False, "--static", help="the static code (kept) instead of a "
                                "dynamic one (5 minutes, one pairing)"),
    json_out: bool = typer.Option(False, "--json", help="pairing_code, pairing_url, node_id"),
    config: Path | None = _CONFIG_OPTION,
    db: Path | None = _DB_OPTION,
) -> None:
    """Show a pairing code for an RM to enter, with the pairing URL and the CEM's node id."""
    site = load_config_or_exit(config)
    from cem.app.pair_cli import code_command

    code_command(site, db or site.store.path, static=static, json_out=json_out)


@pair_app.command("list")
def pair_list(json_out: bool = typer.Option(False, "--json"),
              config: Path | None = _CONFIG_OPTION, db: Path | None = _DB_OPTION) -> None:
    """List paired RMs."""
    site = load_config_or_exit(config)
    from cem.app.pair_cli import list_command

    list_command(db or site.store.path, json_out)


@pair_app.command("remove")
def pair_remove(rm: str = typer.Argument(..., help="node id, resource id or name of the RM"),
                config: Path | None = _CONFIG_OPTION, db: Path | None = _DB_OPTION) -> None:
    """Unpair an RM (a running CEM ends its session)."""
    site = load_config_or_exit(config)
    from cem.app.pair_cli import remove_command

    remove_command(db or site.store.path, rm)


@pair_app.command("rm")
def pair_rm(
    code: str = typer.Option(..., help="the pairing code the RM shows"),
    url: str | None = typer.Option(None, help="the RM's pairing URL (https://.../)"),
    node: str | None = typer.Option(None, help="node id of a client-only RM that long-polls"),
    config: Path | None = _CONFIG_OPTION,
    db: Path | None = _DB_OPTION,
) -> None:
    """Pair with an RM that shows a code (this CEM is the initiator)."""
    site = load_config_or_exit(config)
    from cem.app.pair_cli import rm_command

    rm_command(site, db or site.store.path, url=url, node=node, code=code)


@pair_app.command("discover")
def pair_discover(timeout: float = typer.Option(3.0, min=0.5, help="seconds to listen"),
                  json_out: bool = typer.Option(False, "--json")) -> None:
    """List RMs that announce themselves over DNS-SD (_s2connect._tcp, subtype _rm)."""
    from cem.app.pair_cli import discover_command

    discover_command(timeout, json_out)


# --- planning ----------------------------------------------------------------------------------


@app.command()
def plan(
    scenario: Path = typer.Option(..., "--scenario", "-s", help="scenario JSON file"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Path | None = typer.Option(None, help="write a PNG plot of the plan"),
    time_limit: float = typer.Option(1.0, help="CP-SAT time limit, s"),
) -> None:
    """Plan a scenario file offline and print the plan."""
    from cem.app.plan_cli import plan_command

    plan_command(scenario, json_out=json_out, plot=plot, time_limit=time_limit)


@bench_app.command("planner")
def bench_planner(
    evs: list[int] = typer.Option([10, 100, 1000], "--evs", help="EV counts (repeatable)"),
    ptus: int = typer.Option(96, help="horizon in PTUs"),
    instances: int = typer.Option(5, help="instances per size"),
    time_limit: float = typer.Option(3.0, help="CP-SAT time limit, s"),
    json_out: bool = typer.Option(False, "--json"),
    live_shape: bool = typer.Option(True, "--live-shape/--no-live-shape",
                                    help="give every EV the departure milestones of a live replan"),
) -> None:
    """Benchmark the planner on scenarios built from real ACN sessions and NL prices."""
    from cem.app.bench_planner import bench_command

    bench_command(evs=evs, ptus=ptus, instances=instances, time_limit=time_limit,
                  json_out=json_out, live_shape=live_shape)


@bench_app.command("replan")
def bench_replan(
    evs: int = typer.Option(1000, min=1, help="EV chargers (S2 FRBC RMs) on the site"),
    replans: int = typer.Option(3, min=1, help="replans to time"),
    warmup: int = typer.Option(0, min=0, help="replans after the cold start, before the timed "
                               "ones, not timed (steady state: the LP has caught up)"),
    time_limit: float | None = typer.Option(None, min=0.1, help="planner.time_limit_s "
                                            "(default: the config default)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Benchmark a live replan: its time and how long S2 sessions wait meanwhile."""
    from cem.app.bench_replan import bench_command

    bench_command(evs=evs, replans=replans, json_out=json_out, time_limit_s=time_limit,
                  warmup=warmup)


@bench_app.command("faults")
def bench_faults(
    where: str = typer.Option("twin,demo", help="twin, demo or twin,demo"),
    faults: str | None = typer.Option(None, help="comma list of faults (default: all): "
                                      "rm_disconnect, meter_silent, meter_stale, "
                                      "solver_timeout, instructions_late, instructions_refused, "
                                      "prices_missing, cem_restart"),
    twin_ptus: int | None = typer.Option(None, min=40, help="simulate only this many PTUs "
                                         "of the twin's day (default: all 96)"),
    demo_hours: float = typer.Option(10.0, min=4.5, help="simulated hours per demo run "
                                     "(from 06:00; the fault comes at 09:00 for an hour)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Fault campaign: each fault against a run without it, on the twin and the demo site."""
    from cem.app.bench_faults import bench_command

    bench_command(where=where, faults=faults, json_out=json_out, twin_ptus=twin_ptus,
                  demo_hours=demo_hours)


@bench_app.command("s2")
def bench_s2(
    rms: int = typer.Option(1000, help="number of concurrent RMs"),
    messages: int = typer.Option(20, help="messages each RM sends after the handshake"),
    json_out: bool = typer.Option(False, "--json"),
    rate: float = typer.Option(5000.0, min=0, help="total messages/s over all RMs; 0: as fast "
                               "as the CEM acknowledges"),
    http: bool = typer.Option(False, "--http", help="run twice: without and with the "
                              "dashboard served and one page open; report the difference"),
    cem_src: Path | None = typer.Option(None, "--cem-src", help="a baseline: also run the CEM "
                                        "of this checkout (e.g. main), alternating with this "
                                        "one, and report both"),
    rounds: int = typer.Option(1, help="with --cem-src: baseline and this, this many times"),
    busy_core: bool = typer.Option(False, "--busy-core", help="keep one core busy with a "
                                   "CPU-bound process during the message phase"),
    profile: Path | None = typer.Option(None, "--profile", help="py-spy samples the CEM's "
                                        "threads in the message phase; stacks (collapsed) to "
                                        "this file"),
    duration: float | None = typer.Option(None, "--duration", help="a soak: the RMs keep "
                                          "sending at --rate for this many seconds (instead "
                                          "of --messages each); the CEM's memory is sampled"),
    sample_every: float = typer.Option(10.0, "--sample-every", help="with --duration: "
                                       "seconds between samples of the CEM's memory"),
    floor: bool = typer.Option(False, "--floor", help="also run a server that only answers "
                               "(no S2 work) on the same event loop, --rounds times "
                               "alternating, and report the CEM's CPU above that floor"),
    measurement_log_interval: float | None = typer.Option(
        None, "--measurement-log-interval", min=0, help="the CEM's store."
        "measurement_log_interval_s (0: log every measurement); default: the CEM's own"),
    read_batch_ms: float | None = typer.Option(
        None, "--read-batch-ms", min=0, max=50, help="the CEM's server.read_batch_ms (0: "
        "off); default: the CEM's own"),
) -> None:
    """Benchmark the S2 server: connect N RMs and measure acknowledgements."""
    from cem.app.bench_s2 import bench_command

    bench_command(rms=rms, messages=messages, json_out=json_out, rate=rate, http=http,
                  cem_src=cem_src, rounds=rounds, busy_core=busy_core, profile=profile,
                  duration_s=duration, sample_every_s=sample_every, floor=floor,
                  measurement_log_interval_s=measurement_log_interval,
                  read_batch_ms=read_batch_ms)


# --- resource managers and simulators --------------------------------------------------------


@rm_app.command("ocpp")
def rm_ocpp(
    cem: str = typer.Option("ws://127.0.0.1:8765", help="CEM S2 websocket URL"),
    port: int | None = typer.Option(None, min=0, max=65535,
                                    help="OCPP port (default from config, 9000)"),
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    token: str | None = typer.Option(None, help="bearer token for the CEM"),
) -> None:
    """Run the OCPP 1.6J / 2.0.1 central system as an S2 resource manager."""
    site = load_config_or_exit(config)
    from resource_managers.ocpp_charger.cli import run_ocpp_rm

    run_ocpp_rm(site.ocpp_rm(), cem_url=cem, port=port, token=token)


@rm_app.command("modbus")
def rm_modbus(
    device: str | None = typer.Option(None, help="battery, heat-pump, pv or meter"),
    map_file: Path | None = typer.Option(None, "--map", help="register map TOML"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(5020, min=0, max=65535),
    device_id: int = typer.Option(1, help="Modbus device (unit) id"),
    cem: str = typer.Option("ws://127.0.0.1:8765", help="CEM S2 websocket URL"),
    token: str | None = typer.Option(None, help="bearer token for the CEM"),
    config: Path | None = typer.Option(None, "--config", "-c", help="site file: run its "
                                       "[[modbus.devices]] instead of --device / --map"),
    name: list[str] = typer.Option([], "--name", help="with --config: only these devices"),
) -> None:
    """Run Modbus TCP devices as S2 resource managers (one from flags, or a site file's)."""
    from resource_managers.modbus.cli import run_modbus_rm, run_modbus_rms

    if config is None:
        if device is None or map_file is None:
            fail(escape("give --device and --map, or --config with a site file's "
                        "[[modbus.devices]]"))
        run_modbus_rm(device=device, map_file=map_file, host=host, port=port,
                      device_id=device_id, cem_url=cem, token=token)
        return
    run_modbus_rms(_modbus_devices(config, device, map_file, name), cem_url=cem, token=token)


def _modbus_devices(config: Path, device: str | None, map_file: Path | None,
                    names: list[str]) -> list[ModbusDevice]:
    """The `[[modbus.devices]]` of a site file (only `names` if given); exit 2 when none."""
    if device is not None or map_file is not None:
        fail("--config takes the devices from the site file: leave out --device and --map")
    devices = load_config_or_exit(config).modbus.devices
    unknown = sorted(set(names) - {d.name for d in devices})
    if unknown:
        fail(f"no Modbus device named {', '.join(map(repr, unknown))} in {config}",
             f"the file has: {', '.join(repr(d.name) for d in devices) or 'none'}")
    chosen = [d for d in devices if not names or d.name in names]
    if not chosen:
        fail(escape(f"{config} has no [[modbus.devices]]"), "add one per device, see the README")
    return chosen


@sim_app.command("chargers")
def sim_chargers(
    count: int = typer.Option(4, help="number of charge points"),
    ocpp: str = typer.Option("1.6", help="1.6 or 2.0.1"),
    csms: str = typer.Option("ws://127.0.0.1:9000", help="central system URL"),
    sessions: Path | None = typer.Option(None, help="sessions CSV (ACN format)"),
    speed: float = typer.Option(1.0, help="simulated seconds per wall-clock second"),
    config: Path | None = typer.Option(
        None, "--config", "-c",
        help="site config: simulate its ocpp.charge_points (ids, phases, passwords)"),
    ca: Path | None = typer.Option(
        None, help="for a wss:// central system: the certificate (PEM) to trust"),
) -> None:
    """Run simulated OCPP charge points with simulated EVs."""
    from resource_managers.ocpp_charger.cli import run_charger_simulators

    site = load_config_or_exit(config) if config is not None else None
    run_charger_simulators(count=count, ocpp=ocpp, csms=csms, sessions=sessions, speed=speed,
                           charge_points=site.ocpp.charge_points if site else (), ca=ca)


@sim_app.command("modbus")
def sim_modbus(
    device: str | None = typer.Option(None, help="battery, heat-pump, pv or meter"),
    map_file: Path | None = typer.Option(None, "--map", help="register map TOML"),
    port: int = typer.Option(5020, min=0, max=65535),
    host: str = typer.Option("127.0.0.1"),
    speed: float = typer.Option(1.0, help="simulated seconds per wall-clock second"),
    config: Path | None = typer.Option(None, "--config", "-c", help="site file: simulate its "
                                       "[[modbus.devices]] on their host and port"),
    name: list[str] = typer.Option([], "--name", help="with --config: only these devices"),
) -> None:
    """Run simulated Modbus TCP devices with physics (one from flags, or a site file's)."""
    from resource_managers.modbus.cli import run_modbus_simulator, run_modbus_simulators

    if config is None:
        if device is None or map_file is None:
            fail(escape("give --device and --map, or --config with a site file's "
                        "[[modbus.devices]]"))
        run_modbus_simulator(device=device, map_file=map_file, host=host, port=port, speed=speed)
        return
    run_modbus_simulators(_modbus_devices(config, device, map_file, name), speed=speed)


@app.command()
def sessions(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="OCPP RM database (default ocpp.database)"),
) -> None:
    """Show live charging sessions."""
    site = load_config_or_exit(config)
    from resource_managers.ocpp_charger.cli import print_sessions

    print_sessions(db or site.ocpp.database, timezone=site.site.timezone)


@app.command()
def cdrs(
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="site config TOML (default: built-in defaults)"),
    db: Path | None = typer.Option(None, help="OCPP RM database (default ocpp.database)"),
    csv: Path | None = typer.Option(None, help="write the CDRs to this CSV file"),
) -> None:
    """Show (or export) charge detail records."""
    site = load_config_or_exit(config)
    from resource_managers.ocpp_charger.cli import print_cdrs

    print_cdrs(db or site.ocpp.database, csv=csv, timezone=site.site.timezone)


# --- whole site ------------------------------------------------------------------------------


@app.command()
def demo(
    config: Path = typer.Option(DEMO_CONFIG, "--config", "-c", help="site config TOML"),
    duration: float | None = typer.Option(None, help="stop after this many wall-clock seconds"),
    speed: float | None = typer.Option(None, help="simulated seconds per wall-clock second"),
    report: Path = typer.Option(Path("demo-report"), help="folder for the report"),
) -> None:
    """Run a whole simulated site on loopback with the real protocols."""
    from cem.app.demo_view import demo_command

    demo_command(config=config, duration=duration, speed=speed, report=report)


@app.command()
def simulate(
    site_file: Path = typer.Option(..., "--site", help="site config TOML"),
    sessions_file: Path = typer.Option(..., "--sessions", help="sessions CSV (ACN format)"),
    prices: Path = typer.Option(..., help="day-ahead prices CSV"),
    pv: Path | None = typer.Option(None, help="PV per kWp CSV"),
    start: str = typer.Option(..., help="first day, YYYY-MM-DD"),
    days: int = typer.Option(7, min=1),
    levels: str = typer.Option("1,2,3,4,5", help="smart-charging levels to compare"),
    report: Path = typer.Option(Path("report"), help="folder for the report"),
    json_out: bool = typer.Option(False, "--json"),
    pv_kwp: float | None = typer.Option(None, help="kWp of PV installed (default 100 with --pv)"),
    pv_forecast: str = typer.Option("perfect", help="level 5's PV forecast: perfect, or "
                                    "persistence (the day before's PV)"),
    ocpp16_share: float = typer.Option(0.3, help="share of sessions on OCPP 1.6 chargers: "
                                       "no SoC, departure or energy need reaches the CEM"),
    ev_taper: bool = typer.Option(True, help="EVs take less above 80 percent SoC (--no-ev-taper: "
                                  "constant power until full)"),
) -> None:
    """Digital twin: compare the five levels of smart charging on real sessions."""
    from cem.app.simulate_cli import simulate_command

    simulate_command(site_file=site_file, sessions_file=sessions_file, prices=prices, pv=pv,
                     start=start, days=days, levels=levels, report=report, json_out=json_out,
                     pv_kwp=pv_kwp, pv_forecast=pv_forecast, ocpp16_share=ocpp16_share,
                     ev_taper=ev_taper)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
