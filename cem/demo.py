"""`cem demo`: until the whole-site demo lands, run the CEM with the example site config."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

EXAMPLE = Path(__file__).resolve().parent.parent / "specs" / "sites" / "example.toml"


def demo_command(*, config: Path, duration: float | None, speed: float | None,
                 report: Path) -> None:
    """Run the CEM on the example site and say that the simulated devices come later."""
    from cem.cli import load_config_or_exit
    from cem.service import run_service

    console = Console(stderr=True)
    chosen = config if config.exists() else EXAMPLE
    console.print(
        "[bold]cem demo[/]: the simulated whole site (chargers, battery, heat pump, PV) is not "
        f"here yet; running the CEM with [cyan]{chosen}[/] instead. Connect S2 resource "
        "managers to it; Ctrl-C stops it."
    )
    site = load_config_or_exit(chosen)
    sys.exit(run_service(site, log_level="INFO"))
