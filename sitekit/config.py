"""Config machinery the CEM and the resource managers share, so both report problems alike.

- `Section`: the base of every config section; unknown keys are errors (a typo must not
  silently fall back to a default).
- `TlsFiles`: a server's certificate and key for wss (the CEM's S2 server, the OCPP central
  system).
- `ConfigProblem` / `ConfigError`: what is wrong, where (dotted path and line) and a hint.
- `validate_toml` / `read_config_text`: TOML text -> a section model, or a `ConfigError`
  listing every problem at once.
- `EvDefaults`: the one section both sides read (`[ev_defaults]`).

A deployment file holds the sections of several parts (the CEM, the OCPP central system, the
Modbus devices); the model that composes them lives at the edge (`cem.app.site_file`). Each
part's own model only declares its sections.
"""

from __future__ import annotations

import difflib
import re
import ssl
import tomllib
from collections.abc import Iterable
from datetime import time
from pathlib import Path
from typing import Any, TypeVar, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_TIMEZONE = "Europe/Amsterdam"

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and so are inf and nan."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def iana_zone(value: str) -> str:
    """`value` if it is an IANA time zone this machine knows; else ValueError with a
    "did you mean" (a wrong zone would only fail later, when local times are shown)."""
    try:
        ZoneInfo(value)
        return value
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        pass
    close = difflib.get_close_matches(value, sorted(available_timezones()), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "use an IANA zone like 'Europe/Amsterdam'"
    raise ValueError(f"{value!r} is not a known time zone: {hint}")


def divides_hour(minutes: int) -> int:
    """PTU lengths must tile an hour (prices and settlement are per hour or quarter)."""
    if minutes <= 0 or 60 % minutes:
        raise ValueError(f"{minutes} does not divide 60: use 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 "
                         "or 60 (15 in the Netherlands)")
    return minutes


def resolve(base: Path, path: Path) -> Path:
    """A path from a config file: relative paths are relative to the file's folder."""
    return path if path.is_absolute() else base / path


def missing_files(items: Iterable[tuple[str, Path | None]], hint: str = "") -> list[ConfigProblem]:
    """A problem for each (dotted path, file) whose file does not exist (None: not set)."""
    return [ConfigProblem(path=where, message=f"file not found: {file}", hint=hint)
            for where, file in items if file is not None and not file.exists()]


class TlsFiles(Section):
    """A server's certificate and key (PEM) for wss; both or neither."""

    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> TlsFiles:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for wss, or neither")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for wss (None for plain ws); raises ssl.SSLError / OSError."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return context

    def resolve_tls_paths(self, base: Path) -> None:
        """Make the certificate and key paths relative to the config file's folder."""
        if self.tls_cert is not None:
            self.tls_cert = resolve(base, self.tls_cert)
        if self.tls_key is not None:
            self.tls_key = resolve(base, self.tls_key)

    def missing_tls_files(self, section: str) -> list[ConfigProblem]:
        """Problems for a certificate or key file that does not exist."""
        return missing_files([(f"{section}.tls_cert", self.tls_cert),
                              (f"{section}.tls_key", self.tls_key)])


class ConfigProblem(BaseModel):
    """One thing wrong with a config file, as an operator reads it."""

    path: str
    message: str
    hint: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (line {self.line})" if self.line else "")
        text = f"{where}: {self.message}"
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


class ConfigError(Exception):
    """The config file cannot be used; `problems` says why, each with its place."""

    def __init__(self, file: Path, problems: list[ConfigProblem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: {len(problems)} problem(s)")

    def report(self) -> str:
        lines = [f"{self.file}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


HINTS = {
    "extra_forbidden": "not a known setting here: check the spelling against the README",
    "finite_number": "write a finite number (inf and nan are not allowed)",
    "less_than": "the value must be smaller",
    "missing": "this setting is required",
    "greater_than": "the value must be larger",
    "greater_than_equal": "the value must be at least the minimum",
    "less_than_equal": "the value must be at most the maximum",
    "literal_error": "use one of the values listed",
    "int_parsing": "write a whole number",
    "float_parsing": "write a number",
    "datetime_from_date_parsing": "write an ISO 8601 time with offset, e.g. 2026-11-23T17:00:00+01:00",
    "datetime_parsing": "write an ISO 8601 time with offset, e.g. 2026-11-23T17:00:00+01:00",
    "bool_parsing": "write true or false",
    "string_too_short": "the value is too short",
}


def dotted_path(loc: tuple[int | str, ...]) -> str:
    """pydantic loc -> `grid.fuse_a`, `evs[1].departure`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def find_line(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best-effort line of the last key named in loc (TOML parsers keep no positions)."""
    keys = [p for p in loc if isinstance(p, str)]
    if not keys:
        return None
    key = keys[-1]
    pattern = re.compile(rf"^\s*(\[\[?\s*[\w.]*{re.escape(key)}\s*\]\]?|{re.escape(key)}\s*=)")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section model inside a field's type (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def settings_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The setting names a section at `loc` (a pydantic location) knows; None if unknown."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    return list(current.model_fields) if current is not None else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def problems_of(error: ValidationError, text: str,
                model: type[BaseModel] | None = None) -> list[ConfigProblem]:
    """Every problem pydantic found, with its dotted path, its line in `text` and a hint
    (a "did you mean" for a misspelt setting or value, when one is close)."""
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        hint = HINTS.get(err["type"], "")
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
            known = settings_at(model, loc[:-1]) if model is not None else None
            if known:
                guess = did_you_mean(str(loc[-1]), known)
                hint = f"not a known setting here: {guess + ' ' if guess else ''}" \
                    f"(known: {', '.join(known)})"
        if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            message = f"got {err.get('input')!r}, expected {err['ctx']['expected']}"
            values = re.findall(r"'([^']*)'", str(err["ctx"]["expected"]))
            guess = did_you_mean(str(err.get("input")), values)
            hint = f"{guess} (use one of the values listed)" if guess else hint
        problems.append(ConfigProblem(path=dotted_path(loc), message=message, hint=hint,
                                      line=find_line(text, loc)))
    return problems


def validate_toml(text: str, model: type[M], file: Path = Path("<string>")) -> M:
    """Parse TOML text into `model`, or raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line_match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, [ConfigProblem(
            path="(file)", message=f"not valid TOML: {exc}",
            hint="check quotes, brackets and '=' signs",
            line=int(line_match.group(1)) if line_match else None)]) from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(file, problems_of(exc, text, model)) from None


def read_config_text(file: Path) -> str:
    """The text of a config file, or a ConfigError that says why it cannot be read."""
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, [ConfigProblem(path="(file)", message="file not found",
                                               hint="check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, [ConfigProblem(path="(file)",
                                               message=f"cannot read the file: {exc}")]) from None


def config_folder(file: Path) -> Path:
    """The folder relative paths in `file` are relative to (the working directory for text)."""
    return file.parent if file.name != "<string>" else Path.cwd()


class EvDefaults(Section):
    """What is assumed about an EV when neither the EV nor its charge card says.

    Shared: the OCPP resource manager gives a session these needs, and the CEM (planner
    priority, the digital twin) assumes the same.
    """

    energy_kwh: float = Field(default=20.0, gt=0, le=500,
                              description="energy need when nothing better is known")
    dwell_hours: float = Field(default=8.0, gt=0, le=168,
                               description="departure = arrival + this")
    departure: time | None = Field(default=None,
                                   description="fixed local departure time instead")
    priority: int = Field(default=1, ge=0, le=10)
    min_current_a: float = Field(default=6.0, gt=0, le=32)
