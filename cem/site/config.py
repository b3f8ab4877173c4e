"""The CEM's configuration: its sections of the site file, validated by pydantic.

What the CEM itself uses lives here: where it listens, which RM tokens it accepts, the grid
connection (fuse, GTV, export limit, kW-max price), prices, congestion windows, planner
settings and the EV defaults it assumes. The sections of the resource managers beside it
(`[ocpp]`, `[[charge_cards]]`, `[[modbus.devices]]`) are theirs
(`resource_managers/*/config.py`); `cem.app.site_file` composes them all into the one site file
an operator writes. Unknown keys are errors (a typo must not silently fall back to a default).
The machinery (strict sections, problems with line and hint) is shared with the RMs:
`sitekit.config`.
"""

from __future__ import annotations

import re
from datetime import datetime, time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sitekit.config import (
    ConfigError,
    ConfigProblem,
    EvDefaults,
    Section,
    TlsFiles,
    config_folder,
    divides_hour,
    dotted_path,
    iana_zone,
    missing_files,
    read_config_text,
    resolve,
    validate_toml,
)

__all__ = [
    "CONTROL_TYPES", "ConfigError", "ConfigProblem", "CongestionWindow", "EnergyZeroConfig",
    "EntsoeConfig", "EvDefaults", "GridConfig", "OpenAdrConfig", "PlannerConfig", "PriceConfig",
    "RmToken", "S2Config", "S2ConnectConfig", "Section", "ServerConfig", "SiteConfig", "SiteInfo",
    "StoreConfig", "TlsFiles",
    "check_referenced_files", "dotted_path", "load_site_config", "parse_site_config",
    "resolve_paths",
]

CONTROL_TYPES = ("FRBC", "PPBC", "OMBC", "DDBC", "PEBC")


class SiteInfo(Section):
    name: str = "My site"
    timezone: str = Field("Europe/Amsterdam", description="IANA zone for display and tariffs")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return iana_zone(value)


class RmToken(Section):
    name: str = Field(..., description="who holds this token (shown in logs)")
    token: str = Field(..., min_length=16, description="bearer token, at least 16 characters")


class ServerConfig(TlsFiles):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    tokens: list[RmToken] = Field(default_factory=list)
    ping_interval_s: float = Field(20.0, gt=0, le=3600)
    ping_timeout_s: float = Field(20.0, gt=0, le=3600)
    reception_status_timeout_s: float = Field(10.0, gt=0, le=600)
    max_message_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_connections: int = Field(5000, ge=1, description="open S2 connections at most; more "
                                 "are refused (HTTP 503)")
    max_failed_auth_per_minute: int = Field(20, ge=1, description="failed authentications "
                                            "per address per minute before the address is "
                                            "refused for a while (HTTP 429)")
    read_batch_ms: float = Field(0.0, ge=0, le=50, description="after reading from an RM, "
                                 "the CEM looks at its sockets again at most this many ms after "
                                 "its last read, so that what other RMs send meanwhile is read in "
                                 "one wake-up (less CPU per message; a message is read at most "
                                 "this much later; on uvloop the loop's other work waits too); "
                                 "0 (default): off")


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
    retention_days: int = Field(30, ge=1, le=3650, description="message log kept this many days")
    measurement_log_interval_s: float = Field(
        60.0, ge=0, le=86400,
        description="an RM's accepted PowerMeasurements are logged (message log and measurements "
                    "table) at most once per this many seconds; every other message is logged; "
                    "0: every measurement")


class GridConfig(Section):
    fuse_a: float = Field(25.0, ge=6, le=4000, description="main fuse per phase, A")
    phases: Literal[1, 3] = 3
    voltage_v: float = Field(230.0, ge=100, le=480, description="phase voltage, V")
    import_limit_kw: float = Field(17.0, gt=0, description="contracted capacity (GTV), kW")
    export_limit_kw: float = Field(17.0, ge=0)
    peak_price_eur_per_kw: float = Field(0.0, ge=0, description="kW-max price per month")
    peak_so_far_kw: float = Field(0.0, ge=0, description="15-min peak reached this month")


class EntsoeConfig(Section):
    """ENTSO-E Transparency day-ahead prices (`entsoe-py`)."""

    token: str | None = Field(None, description="security token (else env ENTSOE_API_KEY)")
    bidding_zone: str = Field("10YNL----------L", description="EIC code or entsoe-py area (NL)")
    base_url: str | None = Field(None, description="API endpoint; default the public one")
    timeout_s: float = Field(30.0, gt=0, le=300)


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
    retry_s: float = Field(60.0, gt=0, le=86400,
                           description="first retry after a failed fetch; doubles")
    retry_max_s: float = Field(1800.0, gt=0, le=86400,
                               description="longest wait between retries")
    refresh_s: float = Field(21600.0, gt=0, le=7 * 86400,
                             description="re-fetch this often for corrections")
    fallback: Literal["flat", "csv"] = Field(
        "flat", description="when the feed's last prices no longer cover the horizon")
    markup_eur_per_kwh: float = 0.0
    tax_eur_per_kwh: float = 0.0
    vat: float = Field(0.0, ge=0, le=1)
    feed_in: Literal["day_ahead", "fixed", "none"] = "day_ahead"
    feed_in_eur_per_kwh: float = 0.0
    flat_import_eur_per_kwh: float = Field(0.25, description="used when no price file is given")

    @field_validator("market_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return iana_zone(value)

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
    poll_interval_s: float = Field(60.0, gt=0, le=86400)
    safe_mode_after_s: float = Field(900.0, gt=0, le=7 * 86400,
                                     description="VTN unreachable this long: safe mode")
    safe_mode_import_limit_kw: float | None = Field(
        None, ge=0, description="safe mode limit when the program has no safe-mode event")
    timeout_s: float = Field(10.0, gt=0, le=300)
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
    time_limit_s: float = Field(1.0, gt=0, le=300)
    replan_min_interval_s: float = Field(5.0, ge=0, le=3600)
    deviation_threshold_w: int = Field(2000, ge=0)
    ev_finish_margin_minutes: int = Field(15, ge=0, le=240,
                                          description="aim to reach EV targets this early")
    limit_share: float = Field(0.98, gt=0.5, le=1,
                               description="share of fuse and import limit plans may use")
    guard_margin: float = Field(0.95, gt=0, le=1, description="guard sheds down to this share")
    safe_departure_quantile: float = Field(
        0.05, ge=0, le=0.5, description="plan EVs to this quantile of their learned departure "
        "(0: to the typed departure)")
    value_of_undelivered_kwh_eur: float = Field(
        1.0, ge=0, le=100, description="EUR per kWh an EV misses by its safe departure")
    departure_scenario_quantiles: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.5], description="more departure quantiles, each a milestone priced at "
        "the value times the share of drivers leaving between it and the next")
    ev_front_load_kwh: float = Field(
        5.0, ge=0, le=100, description="every EV that wants energy is asked this much (kWh, "
        "at most its need) within `ev_front_load_minutes` of its arrival, each kWh short priced "
        "at the value of an undelivered kWh (0: off)")
    ev_front_load_minutes: int = Field(
        60, ge=15, le=480, description="the window after arrival for `ev_front_load_kwh`")
    ev_front_load_eur_per_kwh: float | None = Field(
        None, ge=0, le=100, description="EUR per kWh short of `ev_front_load_kwh` (none: the "
        "value of an undelivered kWh); below the price gap to the site's PV or cheap hours "
        "the plan waits for them")
    ev_open_need_kwh: float = Field(
        10.0, ge=0, le=100, description="an EV that tells no need (OCPP 1.6) and still takes "
        "energy is asked at least this much more than it has, at its departure milestones' "
        "prices, until it stops drawing (0: only what comparable visits took)")
    departures_relative: bool = Field(
        True, description="learn departures as the share of the typed stay drivers stayed "
        "(false: as hours before the typed departure)")
    departures_by_typed_stay: bool = Field(
        False, description="learn the departures of an arrival hour per typed stay too (0-3, "
        "3-6, 6-9, 9+ h) before all of that hour's visits")
    late_departure_quantile: float = Field(
        0.0, ge=0, le=0.5, description="where even this quantile of the real departure that "
        "comparable drivers' visits give for a typed one lies after the typed departure, plan "
        "the target to that later time, each kWh short then at the value of an undelivered kWh, "
        "and only `late_departure_floor_share` of the typed need by the typed departure (0: "
        "off; never after the typed departure)")
    late_departure_floor_share: float = Field(
        0.5, ge=0, le=1, description="the share of the typed need still asked by the typed "
        "departure (at the unmet-target weight) of an EV planned past it")
    ev_taper_from_soc: float = Field(
        80.0, ge=50, le=100, description="EVs that report their SoC are assumed to take less "
        "above this SoC (%): their milestones move earlier by the extra time (100: off)")
    commit_started_charging: bool = Field(
        True, description="keep a charge the last plan started in the running PTU")
    congestion_fast_path: bool = Field(
        True, description="a congestion limit in force now or from the next PTU caps the plan "
        "in force at once (least urgent loads first), before the replan")
    follow_up_replans: int = Field(
        3, ge=0, le=20, description="a plan more than 1 % above its bound whose LP ran out of "
        "time asks for the next replan at once (the LP goes on from its basis, with three "
        "times the time limit), this many in a row at most (0: off)")

    @field_validator("ptu_minutes")
    @classmethod
    def _tiles_an_hour(cls, value: int) -> int:
        return divides_hour(value)


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


class HttpConfig(Section):
    """The dashboard, HTTP API and metrics served by `cem run` and `cem demo`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tokens: list[RmToken] = Field(
        default_factory=list,
        description="bearer tokens for writes (and for reads from other hosts than loopback)")
    push_interval_s: float = Field(1.0, ge=0.1, le=60,
                                   description="how often the page gets fresh state")
    history_hours: float = Field(6.0, gt=0, le=48, description="site power kept for the chart")


class SiteConfig(Section):
    """The CEM's sections of the site file."""

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
    s2connect: S2ConnectConfig = Field(default_factory=S2ConnectConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @model_validator(mode="after")
    def _unique_tokens(self) -> SiteConfig:
        tokens = [t.token for t in self.server.tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError("server.tokens: a token is listed twice")
        http_tokens = [t.token for t in self.http.tokens]
        if len(set(http_tokens)) != len(http_tokens):
            raise ValueError("http.tokens: a token is listed twice")
        return self


def resolve_paths(config: SiteConfig, base: Path) -> SiteConfig:
    """Relative file paths in the CEM's sections (the store too) are relative to the config
    file's folder."""
    if str(config.store.path) != ":memory:":
        config.store.path = resolve(base, config.store.path)
    if config.prices.csv is not None:
        config.prices.csv = resolve(base, config.prices.csv)
    if config.openadr is not None and config.openadr.ca_file is not None:
        config.openadr.ca_file = resolve(base, config.openadr.ca_file)
    config.server.resolve_tls_paths(base)
    if config.s2connect.tls_dir is not None:
        config.s2connect.tls_dir = resolve(base, config.s2connect.tls_dir)
    return config


def check_referenced_files(config: SiteConfig) -> list[ConfigProblem]:
    """Problems with files the CEM's sections point to (price CSV, TLS files)."""
    return (missing_files([("prices.csv", config.prices.csv)],
                          hint="paths are relative to the config file")
            + config.server.missing_tls_files("server"))


def parse_site_config(text: str, file: Path = Path("<string>")) -> SiteConfig:
    """The CEM's sections alone from TOML text, or a ConfigError listing every problem.

    A site file with the RMs' sections too (`[ocpp]`, `[[modbus.devices]]`) is read by
    `cem.app.site_file`; here those are unknown settings.
    """
    return resolve_paths(validate_toml(text, SiteConfig, file), config_folder(file))


def load_site_config(file: Path) -> SiteConfig:
    """Read a file with the CEM's sections alone (see `parse_site_config`)."""
    return parse_site_config(read_config_text(file), file)
