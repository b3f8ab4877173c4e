"""What every `cem` command shares: user-facing errors (exit 2, no traceback) and loading the
site config."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from cem.app.site_file import SiteFile, load_site_file
from sitekit.config import ConfigError

console = Console(stderr=True)



def fail(message: str, hint: str = "") -> NoReturn:
    """Stop with a user-facing error (exit code 2), no traceback."""
    console.print(f"[bold red]error:[/] {message}")
    if hint:
        console.print(f"  [dim]hint:[/] {hint}")
    raise typer.Exit(2)


def load_config_or_exit(path: Path | None) -> SiteFile:
    """Load a site file (None: the built-in defaults); on problems print them all, exit 2."""
    if path is None:
        return SiteFile()
    try:
        config = load_site_file(path)
    except ConfigError as exc:
        console.print(exc.report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    problems = config.file_problems()
    if problems:
        console.print(ConfigError(path, problems).report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    return config
