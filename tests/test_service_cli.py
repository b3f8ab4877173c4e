"""`cem run` / `cem config check` on bad site files, `cem init`, `cem --version`, the Docker
files: what an operator sees, through the CLI."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cem.app.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

GOOD = "[site]\nname = 'x'\n[store]\npath = 'cem.db'\n[grid]\nfuse_a = 25\n"

# (site file text, where the problem is, what the message says, the fix it suggests)
BAD_FILES = [
    ("[site]\ntimezone = 'Mars/Olympus'\n[grid]\nfuse_a = 25\n", "site.timezone (line 2)",
     "'Mars/Olympus' is not a known time zone", "IANA zone"),
    ("[site]\ntimezone = 'Europe/Amsterdm'\n[grid]\nfuse_a = 25\n", "site.timezone (line 2)",
     "not a known time zone", "did you mean 'Europe/Amsterdam'?"),
    ("[grid]\nfuse_a = 25000\n", "grid.fuse_a (line 2)", "less than or equal to 4000",
     "at most the maximum"),
    ("[grid]\nfuse_a = 2\n", "grid.fuse_a (line 2)", "greater than or equal to 6",
     "at least the minimum"),
    ("[grid]\nfuse_a = 25\nvoltage_v = 1000\n", "grid.voltage_v (line 3)",
     "less than or equal to 480", "at most the maximum"),
    ("[grid]\nfuse_a = 25\nimport_limit_kw = inf\n", "grid.import_limit_kw (line 3)",
     "finite number", "inf and nan are not allowed"),
    ("[grid]\nfuse_a = 25\n[prices]\nmarkup_eur_per_kwh = nan\n",
     "prices.markup_eur_per_kwh (line 4)", "finite number", "inf and nan are not allowed"),
    ("[grid]\nfuse_a = 25\n[planner]\nptu_minutes = 7\n", "planner.ptu_minutes (line 4)",
     "7 does not divide 60", "use 1, 2, 3"),
    ("[grid]\nfuse_a = 25\nimprot_limit_kw = 10\n", "grid.improt_limit_kw (line 3)",
     "unknown setting", "did you mean 'import_limit_kw'?"),
    ("[grid]\nfuse_a = 25\n[prices]\nfeed = 'entsoee'\n", "prices.feed (line 4)",
     "got 'entsoee'", "did you mean 'entsoe'?"),
    ("[grid]\nfuse_a = 25\n[server]\nreception_status_timeout_s = 100000\n",
     "server.reception_status_timeout_s (line 4)", "less than or equal to 600",
     "at most the maximum"),
    ("[grid]\nfuse_a = 25\n[ocpp]\nsafe_limit_a = 500\n", "ocpp.safe_limit_a (line 4)",
     "less than or equal to 80", "at most the maximum"),
    ("[grid]\nfuse_a = 25\n[[modbus.devices]]\nname = 'hp'\ndevice = 'heatpump'\n"
     "map = 'm.toml'\n", "modbus.devices[0].device (line 5)", "got 'heatpump'",
     "did you mean 'heat-pump'?"),
    ("[site]\nname = 'no grid'\n", "grid", "missing: the grid connection is not set",
     "add a [grid] section"),
]


@pytest.mark.parametrize(("text", "where", "message", "fix"), BAD_FILES)
def test_each_bad_site_file_exits_2_with_its_key_line_and_fix_alike_for_check_and_run(
        tmp_path: Path, text: str, where: str, message: str, fix: str) -> None:
    site = tmp_path / "site.toml"
    site.write_text(text)
    checked = runner.invoke(app, ["config", "check", str(site)])
    ran = runner.invoke(app, ["run", "--config", str(site)])
    for result in (checked, ran):
        out = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "Traceback" not in out
        assert where in out and message in out and fix in out, out
    assert " ".join(checked.output.split()) == " ".join(ran.output.split())  # they say the same
    assert not (tmp_path / "cem.db").exists()  # nothing was opened


def test_a_bad_zone_no_longer_crashes_cem_cdrs_later(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[site]\ntimezone = 'Mars/Olympus'\n")
    result = runner.invoke(app, ["cdrs", "--config", str(site)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "site.timezone" in result.output


def test_cem_run_needs_a_site_file_and_a_known_only(tmp_path: Path) -> None:
    bare = runner.invoke(app, ["run"])
    assert bare.exit_code == 2 and "--config" in bare.output and "cem init" in bare.output
    site = tmp_path / "site.toml"
    site.write_text(GOOD)
    wrong = runner.invoke(app, ["run", "--config", str(site), "--only", "ocp"])
    assert wrong.exit_code == 2 and "use cem, ocpp or modbus" in wrong.output
    none = runner.invoke(app, ["run", "--config", str(site), "--only", "ocpp"])
    assert none.exit_code == 2 and "no [ocpp] section" in none.output
    public = runner.invoke(app, ["run", "--config", str(site), "--host", "0.0.0.0"])
    assert public.exit_code == 2 and "server.tokens" in public.output
    assert not (tmp_path / "cem.db").exists()


def test_paths_in_the_site_file_are_relative_to_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from cem.app.site_file import load_site_file

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "site.toml").write_text(GOOD + "[ocpp]\ndatabase = 'data/ocpp.db'\n")
    monkeypatch.chdir(tmp_path)
    site = load_site_file(Path("site/site.toml"))
    assert site.store.path.resolve() == (folder / "cem.db").resolve()
    assert site.ocpp.database.resolve() == (folder / "data" / "ocpp.db").resolve()


def test_cem_init_writes_a_starter_that_checks_and_refuses_to_overwrite(tmp_path: Path) -> None:
    made = runner.invoke(app, ["init", str(tmp_path / "home")])
    assert made.exit_code == 0, made.output
    site = tmp_path / "home" / "site.toml"
    assert "set [grid]" in made.output and site.exists()
    checked = runner.invoke(app, ["config", "check", str(site)])
    assert checked.exit_code == 0, checked.output
    assert "fuse 25 A x 3" in checked.output
    # the commented Modbus examples point at register maps that exist
    maps = [line.split('"')[1] for line in site.read_text().splitlines() if "map = " in line]
    assert maps and all(Path(m).exists() for m in maps)
    again = runner.invoke(app, ["init", str(tmp_path / "home")])
    assert again.exit_code == 2 and "exists already" in again.output and "--force" in again.output


def test_cem_version() -> None:
    result = subprocess.run([sys.executable, "-m", "cem", "--version"], capture_output=True,
                            text=True, check=False, cwd=ROOT)
    import cem

    assert result.returncode == 0 and result.stdout.strip() == f"cem {cem.__version__}"


def test_docker_files_run_the_whole_site_with_commands_that_exist() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"cem", "devices", "chargers"} <= set(services)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    entry = shlex.split(dockerfile.split("ENTRYPOINT")[1].splitlines()[0].strip(' []')
                        .replace('", "', " ").replace('"', ""))
    assert entry == ["cem", "run"]
    commands = {"cem": entry[1:] + services["cem"]["command"]}
    for name in ("devices", "chargers"):
        commands[name] = services[name]["entrypoint"][1:] + services[name]["command"]
    health = dockerfile.split("HEALTHCHECK")[1].split("CMD", 1)[1].splitlines()[0]
    health_cmd = [p.strip(' "[]') for p in health.split(",")]
    assert health_cmd[:2] == ["cem", "status"]
    commands["healthcheck"] = health_cmd[1:]
    for name, argv in commands.items():  # each names a command and options that exist
        words = [a for a in argv if not a.startswith("-")][:2]
        sub = words[:2] if words and words[0] in ("sim", "rm", "config") else words[:1]
        help_text = runner.invoke(app, [*sub, "--help"], env={"COLUMNS": "200"}).output
        for option in (a for a in argv if a.startswith("--")):
            assert option in help_text, f"{name}: {' '.join(sub)} has no {option}"
    # the site file the containers use is valid (its /app paths are this checkout's)
    site = (ROOT / "docker" / "site.toml").read_text().replace("/app/", f"{ROOT}/")
    assert "USER cem" in dockerfile and "chown cem:cem /data" in dockerfile
    assert 'path = "/data/cem.db"' in site and 'database = "/data/ocpp.db"' in site
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore and ".git" in dockerignore and "**/*.db" in dockerignore
    for copied in ("cem", "resource_managers", "sitekit", "specs"):
        assert f"COPY {copied} ./{copied}" in dockerfile


def test_the_docker_site_file_checks(tmp_path: Path) -> None:
    text = (ROOT / "docker" / "site.toml").read_text().replace("/app/", f"{ROOT}/")
    site = tmp_path / "site.toml"
    site.write_text(text.replace("/data/", f"{tmp_path}/"))
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 0, result.output
    assert "2 Modbus device(s)" in result.output
