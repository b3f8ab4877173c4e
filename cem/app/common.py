"""What every `cem` command shares: user-facing errors (exit 2, no traceback) and loading the
site config."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from cem.site.config import ConfigError, SiteConfig, check_referenced_files, load_site_config

console = Console(stderr=True)



def fail(message: str, hint: str = "") -> NoReturn:
    """Stop with a user-facing error (exit code 2), no traceback."""
    console.print(f"[bold red]error:[/] {message}")
    if hint:
        console.print(f"  [dim]hint:[/] {hint}")
    raise typer.Exit(2)


def load_config_or_exit(path: Path | None) -> SiteConfig:
    """Load a site config (None: the built-in defaults); on problems print them all, exit 2."""
    if path is None:
        return SiteConfig()
    try:
        config = load_site_config(path)
    except ConfigError as exc:
        console.print(exc.report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    problems = check_referenced_files(config)
    if problems:
        console.print(ConfigError(path, problems).report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    return config
