"""`cem config check`: every problem with its place and a hint, never a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cem.app.cli import app

runner = CliRunner()
EXAMPLE = Path(__file__).parent.parent / "specs" / "sites" / "example.toml"


def test_example_config_is_valid() -> None:
    result = runner.invoke(app, ["config", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "fuse 25 A x 3" in result.output


def test_every_error_is_listed_with_path_line_and_hint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[grid]\nfuse_a = -3\nphases = 2\nimprot_limit_kw = 10\n\n[server]\nport = 99999\n"
    )
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    out = result.output
    assert "Traceback" not in out
    assert "grid.fuse_a (line 2)" in out
    assert "grid.phases (line 3)" in out
    assert "grid.improt_limit_kw (line 4)" in out
    assert "not a known setting" in out
    assert "server.port (line 7)" in out
    assert "4 problem(s)" in out


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('[grid]\nfuse_a = "25\n')
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert "not valid TOML" in result.output
    assert "line 2" in result.output


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_unsafe_combinations_are_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        "[grid]\nfuse_a = 25\nphases = 3\nimport_limit_kw = 40\n"
        "[server]\nhost = \"0.0.0.0\"\n"
        "[[congestion]]\nstart = 2026-11-23T16:00:00Z\nend = 2026-11-23T18:00:00Z\n"
        "import_limit_kw = 10\n"
        "[[congestion]]\nstart = 2026-11-23T17:00:00Z\nend = 2026-11-23T19:00:00Z\n"
        "import_limit_kw = 8\n"
    )
    result = runner.invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 2
    assert "grid.import_limit_kw" in result.output and "exceeds what the fuse" in result.output
    assert "server.tokens" in result.output
    assert "overlaps" in result.output


def test_commands_work_outside_the_repository_with_built_in_defaults(tmp_path: Path,
                                                                    monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["status", "--db", str(tmp_path / "none.db")])
    assert "Traceback" not in result.output
    assert "specs/sites/example.toml" not in result.output  # no hidden dependency on a checkout


def test_out_of_range_port_is_a_usage_error_not_a_traceback() -> None:
    result = runner.invoke(app, ["run", "--config", str(EXAMPLE), "--port", "99999"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--port" in result.output and "65535" in result.output


def test_the_rms_sections_are_checked_with_the_cems_at_once(tmp_path: Path) -> None:
    """The site file composes the CEM's sections and the RMs' ([ocpp], [[charge_cards]],
    [[modbus.devices]]): one check lists the problems of all of them, each with line and hint."""
    bad = tmp_path / "site.toml"
    bad.write_text(
        "[grid]\nfuse_a = -3\n"                                    # the CEM's
        "[ocpp]\nprot = 9000\n"                                    # the OCPP RM's
        "[[ocpp.charge_points]]\nid = 'CP'\nmax_current_a = 0\n"
        "[[charge_cards]]\nid_tag = 'A'\npriority = 11\n"
        "[[modbus.devices]]\nname = 'x'\ndevice = 'boiler'\nmap = 'm.toml'\n"  # the Modbus RMs'
        "[ev_defaults]\nenergy_kwh = 0\n"                          # shared
    )
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    out = result.output
    assert "Traceback" not in out and "6 problem(s)" in out
    for where in ("grid.fuse_a (line 2)", "ocpp.prot (line 4)",
                  "ocpp.charge_points[0].max_current_a (line 7)",
                  "charge_cards[0].priority (line 10)", "modbus.devices[0].device (line 13)",
                  "ev_defaults.energy_kwh (line 16)"):
        assert where in out, where
    assert "unknown setting" in out and "expected 'battery', 'heat-pump', 'pv' or 'meter'" in out


def test_files_the_rms_sections_name_must_exist(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("[[modbus.devices]]\nname = 'battery'\ndevice = 'battery'\n"
                    "map = 'maps/battery.toml'\n"
                    "[ocpp]\ntls_cert = 'ocpp.crt'\ntls_key = 'ocpp.key'\n")
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert f"ocpp.tls_cert: file not found: {tmp_path / 'ocpp.crt'}" in out  # relative to the file
    assert "ocpp.tls_key" in out
    assert f"modbus.devices[0].map: file not found: {tmp_path / 'maps' / 'battery.toml'}" in out
    assert "register maps live in specs/modbus/" in out
