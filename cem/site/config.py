"""Site configuration: one TOML file, validated by pydantic.

Everything an operator sets lives here: where the CEM listens, which RM tokens it accepts,
the grid connection (fuse, GTV, export limit, kW-max price), prices, congestion windows,
planner settings, charge cards and the resource managers the demo starts. Unknown keys are
errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import re
import ssl
import tomllib
from datetime import datetime, time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONTROL_TYPES = ("FRBC", "PPBC", "OMBC", "DDBC", "PEBC")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class SiteInfo(Section):
    name: str = "My site"
    timezone: str = Field("Europe/Amsterdam", description="IANA zone for display and tariffs")


class RmToken(Section):
    name: str = Field(..., description="who holds this token (shown in logs)")
    token: str = Field(..., min_length=16, description="bearer token, at least 16 characters")


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


class ServerConfig(TlsFiles):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    tokens: list[RmToken] = Field(default_factory=list)
    ping_interval_s: float = Field(20.0, gt=0)
    ping_timeout_s: float = Field(20.0, gt=0)
    reception_status_timeout_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(1_048_576, ge=1024)


class S2Config(Section):
    control_type_preference: list[str] = Field(default_factory=lambda: list(CONTROL_TYPES))

    @field_validator("control_type_preference")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in CONTROL_TYPES]
        if unknown:
            raise ValueError(f"unknown control type(s) {unknown}; use {list(CONTROL_TYPES)}")
        if len(set(value)) != len(value):
            raise ValueError("a control type is listed twice")
        return value


class StoreConfig(Section):
    path: Path = Path("cem.db")
    retention_days: int = Field(30, ge=1, description="message log kept this many days")


class GridConfig(Section):
    fuse_a: float = Field(25.0, gt=0, description="main fuse per phase, A")
    phases: Literal[1, 3] = 3
    voltage_v: float = Field(230.0, gt=0)
    import_limit_kw: float = Field(17.0, gt=0, description="contracted capacity (GTV), kW")
    export_limit_kw: float = Field(17.0, ge=0)
    peak_price_eur_per_kw: float = Field(0.0, ge=0, description="kW-max price per month")
    peak_so_far_kw: float = Field(0.0, ge=0, description="15-min peak reached this month")


class EntsoeConfig(Section):
    """ENTSO-E Transparency day-ahead prices (`entsoe-py`)."""

    token: str | None = Field(None, description="security token (else env ENTSOE_API_KEY)")
    bidding_zone: str = Field("10YNL----------L", description="EIC code or entsoe-py area (NL)")
    base_url: str | None = Field(None, description="API endpoint; default the public one")
    timeout_s: float = Field(30.0, gt=0)


class EnergyZeroConfig(Section):
    """EnergyZero day-ahead prices (`energyzero`, no key)."""

    vat: Literal["excl", "incl"] = Field("excl", description="prices excluding or including VAT")


class PriceConfig(Section):
    csv: Path | None = Field(None, description="day-ahead prices, EUR/MWh, hourly UTC")
    feed: Literal["csv", "entsoe", "energyzero"] | None = Field(
        None, description="where day-ahead prices come from (default: csv if set, else flat)")
    entsoe: EntsoeConfig = Field(default_factory=EntsoeConfig)
    energyzero: EnergyZeroConfig = Field(default_factory=EnergyZeroConfig)
    fetch_after: time = Field(time(13, 0), description="local market time tomorrow's prices "
                              "are fetched from (the auction publishes around 12:45-13:00 CET)")
    market_timezone: str = "Europe/Amsterdam"
    retry_s: float = Field(60.0, gt=0, description="first retry after a failed fetch; doubles")
    retry_max_s: float = Field(1800.0, gt=0, description="longest wait between retries")
    refresh_s: float = Field(21600.0, gt=0, description="re-fetch this often for corrections")
    fallback: Literal["flat", "csv"] = Field(
        "flat", description="when the feed's last prices no longer cover the horizon")
    markup_eur_per_kwh: float = 0.0
    tax_eur_per_kwh: float = 0.0
    vat: float = Field(0.0, ge=0, le=1)
    feed_in: Literal["day_ahead", "fixed", "none"] = "day_ahead"
    feed_in_eur_per_kwh: float = 0.0
    flat_import_eur_per_kwh: float = Field(0.25, description="used when no price file is given")

    @model_validator(mode="after")
    def _feed(self) -> PriceConfig:
        if self.feed == "csv" and self.csv is None:
            raise ValueError("feed = 'csv' needs csv = FILE")
        if self.fallback == "csv" and self.csv is None:
            raise ValueError("fallback = 'csv' needs csv = FILE")
        if self.source == "energyzero" and self.energyzero.vat == "incl" and self.vat > 0:
            raise ValueError("energyzero.vat = 'incl' already includes VAT: set prices.vat = 0 "
                             "(else VAT is counted twice)")
        return self

    @property
    def source(self) -> str | None:
        """The price feed in use: csv, entsoe, energyzero, or None (the flat price)."""
        return self.feed or ("csv" if self.csv is not None else None)


class CongestionWindow(Section):
    start: datetime
    end: datetime
    import_limit_kw: float | None = Field(None, ge=0)
    export_limit_kw: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _order(self) -> CongestionWindow:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end need a timezone, e.g. 2026-11-23T17:00:00+01:00")
        if self.end <= self.start:
            raise ValueError("end must be after start")
        if self.import_limit_kw is None and self.export_limit_kw is None:
            raise ValueError("give import_limit_kw, export_limit_kw or both")
        return self


class OpenAdrConfig(Section):
    """An OpenADR 3 VEN following a grid operator's capacity limits (the Dutch GAC profile)."""

    vtn_url: str = Field(..., description="base URL of the VTN, e.g. https://vtn.example/openadr3/3.1.0")
    version: Literal["3.0.1", "3.1.0"] = "3.1.0"
    client_id: str | None = None
    client_secret: str | None = None
    token: str | None = Field(None, description="a bearer token instead of client credentials")
    ven_name: str = Field(..., min_length=1, max_length=128, description="GAC: eMI3 party id")
    program: str = Field(..., min_length=1, description="name of the program to follow")
    targets: list[str] = Field(default_factory=list, description="the site's EAN18 codes")
    poll_interval_s: float = Field(60.0, gt=0)
    safe_mode_after_s: float = Field(900.0, gt=0, description="VTN unreachable this long: safe mode")
    safe_mode_import_limit_kw: float | None = Field(
        None, ge=0, description="safe mode limit when the program has no safe-mode event")
    timeout_s: float = Field(10.0, gt=0)
    ca_file: Path | None = Field(None, description="CA certificate(s) to trust for the VTN (PEM)")

    @model_validator(mode="after")
    def _check(self) -> OpenAdrConfig:
        from urllib.parse import urlsplit

        url = urlsplit(self.vtn_url)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError(f"vtn_url {self.vtn_url!r} is not an http(s) URL")
        if url.scheme == "http" and not is_loopback(url.hostname):
            raise ValueError("vtn_url must be https:// (plain http only to a loopback address)")
        if self.token is None and (self.client_id is None or self.client_secret is None):
            raise ValueError("give client_id and client_secret, or token")
        bad = [t for t in self.targets if not re.fullmatch(r"\d{18}", t)]
        if bad:
            raise ValueError(f"targets must be EAN18 codes (18 digits): {bad}")
        return self


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address (plain HTTP is allowed only there)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PlannerConfig(Section):
    ptu_minutes: int = Field(15, ge=1, le=60)
    horizon_ptus: int = Field(96, ge=4, le=384)
    time_limit_s: float = Field(1.0, gt=0)
    replan_min_interval_s: float = Field(5.0, ge=0)
    deviation_threshold_w: int = Field(2000, ge=0)
    ev_finish_margin_minutes: int = Field(15, ge=0, le=240,
                                          description="aim to reach EV targets this early")
    limit_share: float = Field(0.98, gt=0.5, le=1,
                               description="share of fuse and import limit plans may use")
    guard_margin: float = Field(0.95, gt=0, le=1, description="guard sheds down to this share")


class EvDefaults(Section):
    energy_kwh: float = Field(20.0, gt=0, description="energy need when nothing better is known")
    dwell_hours: float = Field(8.0, gt=0, description="departure = arrival + this")
    departure: time | None = Field(None, description="fixed local departure time instead")
    priority: int = Field(1, ge=0, le=10)
    min_current_a: float = Field(6.0, gt=0)


class ChargeCard(Section):
    id_tag: str = Field(..., min_length=1, max_length=36)
    name: str = ""
    priority: int = Field(1, ge=0, le=10, description="higher is served first")
    energy_kwh: float | None = Field(None, gt=0)
    departure: time | None = None
    max_current_a: float | None = Field(None, gt=0)
    allowed: bool = True


class ChargePoint(Section):
    id: str = Field(..., min_length=1)
    password: str | None = Field(None, description="HTTP Basic auth (OCPP security profile 1)")
    evses: int = Field(1, ge=1, le=8)
    max_current_a: float = Field(32.0, gt=0)
    phases: Literal[1, 3] = 3
    phase: Literal["L1", "L2", "L3"] = "L1"
    limit_unit: Literal["A", "W"] = "A"


class OcppConfig(TlsFiles):
    """The OCPP central system; with tls_cert / tls_key it serves wss (security profile 2)."""

    host: str = "127.0.0.1"
    port: int = Field(9000, ge=0, le=65535)
    accept_unknown_charge_points: bool = True
    unknown_cards: Literal["accept", "reject"] = "accept"
    safe_limit_a: float = Field(6.0, ge=0, description="TxDefaultProfile limit per charger")
    heartbeat_interval_s: int = Field(300, ge=1)
    database: Path = Path("ocpp.db")
    charge_points: list[ChargePoint] = Field(default_factory=list)


class ModbusDevice(Section):
    name: str
    device: Literal["battery", "heat-pump", "pv", "meter"]
    map: Path
    host: str = "127.0.0.1"
    port: int = Field(5020, ge=0, le=65535)
    device_id: int = Field(1, ge=0, le=247)


class ModbusConfig(Section):
    devices: list[ModbusDevice] = Field(default_factory=list)


class S2ConnectConfig(Section):
    """S2 Connect 1.0.0: the HTTPS pairing and session API, and its own wss listener."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535, description="HTTPS pairing and session API")
    websocket_port: int = Field(8444, ge=0, le=65535, description="wss for paired RMs")
    deployment: Literal["LAN", "WAN"] = "LAN"
    endpoint_name: str = "S2 CEM"
    domain: str | None = Field(None, description="name in URLs: WAN domain, or LAN mDNS name")
    discovery: bool | None = Field(None, description="DNS-SD; default on for a LAN address")
    plain_mode: bool = Field(True, description="keep the Handshake + bearer-token listener")
    tls_dir: Path | None = Field(None, description="CA and leaf; default next to the store")

    @model_validator(mode="after")
    def _wan_domain(self) -> S2ConnectConfig:
        if self.deployment == "WAN" and not self.domain:
            raise ValueError("a WAN deployment needs domain (its name in the pairing URL)")
        return self


class SiteConfig(Section):
    site: SiteInfo = Field(default_factory=SiteInfo)
    server: ServerConfig = Field(default_factory=ServerConfig)
    s2: S2Config = Field(default_factory=S2Config)
    store: StoreConfig = Field(default_factory=StoreConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    prices: PriceConfig = Field(default_factory=PriceConfig)
    congestion: list[CongestionWindow] = Field(default_factory=list)
    openadr: OpenAdrConfig | None = None
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    ev_defaults: EvDefaults = Field(default_factory=EvDefaults)
    charge_cards: list[ChargeCard] = Field(default_factory=list)
    ocpp: OcppConfig = Field(default_factory=OcppConfig)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)
    s2connect: S2ConnectConfig = Field(default_factory=S2ConnectConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> SiteConfig:
        tags = [c.id_tag for c in self.charge_cards]
        if len(set(tags)) != len(tags):
            raise ValueError("charge_cards: an id_tag is listed twice")
        cps = [c.id for c in self.ocpp.charge_points]
        if len(set(cps)) != len(cps):
            raise ValueError("ocpp.charge_points: an id is listed twice")
        tokens = [t.token for t in self.server.tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError("server.tokens: a token is listed twice")
        return self


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


_HINTS = {
    "extra_forbidden": "not a known setting here: check the spelling against the README",
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


def _find_line(text: str, loc: tuple[int | str, ...]) -> int | None:
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


def parse_site_config(text: str, file: Path = Path("<string>")) -> SiteConfig:
    """Parse TOML text into a SiteConfig, or raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line_match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            file,
            [
                ConfigProblem(
                    path="(file)",
                    message=f"not valid TOML: {exc}",
                    hint="check quotes, brackets and '=' signs",
                    line=int(line_match.group(1)) if line_match else None,
                )
            ],
        ) from None
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown setting"
            if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
                message = f"got {err.get('input')!r}, expected {err['ctx']['expected']}"
            problems.append(
                ConfigProblem(
                    path=dotted_path(loc),
                    message=message,
                    hint=_HINTS.get(err["type"], ""),
                    line=_find_line(text, loc),
                )
            )
        raise ConfigError(file, problems) from None
    return _resolve_paths(config, file.parent if file.name != "<string>" else Path.cwd())


def _resolve_paths(config: SiteConfig, base: Path) -> SiteConfig:
    """Relative file paths in a config are relative to the config file."""
    if config.prices.csv is not None and not config.prices.csv.is_absolute():
        config.prices.csv = base / config.prices.csv
    if config.openadr is not None and config.openadr.ca_file is not None \
            and not config.openadr.ca_file.is_absolute():
        config.openadr.ca_file = base / config.openadr.ca_file
    for device in config.modbus.devices:
        if not device.map.is_absolute():
            device.map = base / device.map
    for section in (config.server, config.ocpp):
        for attr in ("tls_cert", "tls_key"):
            value = getattr(section, attr)
            if value is not None and not value.is_absolute():
                setattr(section, attr, base / value)
    if config.s2connect.tls_dir is not None and not config.s2connect.tls_dir.is_absolute():
        config.s2connect.tls_dir = base / config.s2connect.tls_dir
    return config


def load_site_config(file: Path) -> SiteConfig:
    """Read and validate a site config file; raise ConfigError on any problem."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            file, [ConfigProblem(path="(file)", message="file not found", hint="check the path")]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            file, [ConfigProblem(path="(file)", message=f"cannot read the file: {exc}")]
        ) from None
    return parse_site_config(text, file)


def check_referenced_files(config: SiteConfig) -> list[ConfigProblem]:
    """Problems with files the config points to (price CSV, TLS files, Modbus maps)."""
    problems: list[ConfigProblem] = []
    if config.prices.csv is not None and not config.prices.csv.exists():
        problems.append(
            ConfigProblem(path="prices.csv", message=f"file not found: {config.prices.csv}",
                          hint="paths are relative to the config file")
        )
    for name, section in (("server", config.server), ("ocpp", config.ocpp)):
        for attr in ("tls_cert", "tls_key"):
            value = getattr(section, attr)
            if value is not None and not value.exists():
                problems.append(
                    ConfigProblem(path=f"{name}.{attr}", message=f"file not found: {value}")
                )
    for index, device in enumerate(config.modbus.devices):
        if not device.map.exists():
            problems.append(
                ConfigProblem(path=f"modbus.devices[{index}].map",
                              message=f"file not found: {device.map}",
                              hint="register maps live in specs/modbus/")
            )
    return problems
