"""The OCPP resource manager's configuration: its sections of the site file, and what it runs on.

Sections of the site file (`[ocpp]` with `[[ocpp.charge_points]]`, `[[charge_cards]]`) are
declared here; the edge (`cem.app.site_file`) composes them with the CEM's sections into the
one file an operator writes, and hands the central system an `OcppRmConfig`: these sections
plus what it takes from the rest of the file (`[ev_defaults]`, the site's time zone and fuse,
the tariff for CDR costs).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sitekit.config import (
    DEFAULT_TIMEZONE,
    ConfigProblem,
    EvDefaults,
    Section,
    TlsFiles,
    iana_zone,
    resolve,
)

__all__ = ["CdrTariff", "ChargeCard", "ChargePoint", "EvDefaults", "OcppConfig", "OcppRmConfig",
           "duplicate_ids"]


class ChargeCard(Section):
    """An RFID card: who it is, how much they are served first, what they usually need."""

    id_tag: str = Field(..., min_length=1, max_length=36)
    name: str = ""
    priority: int = Field(default=1, ge=0, le=10, description="higher is served first")
    energy_kwh: float | None = Field(default=None, gt=0)
    departure: time | None = None
    max_current_a: float | None = Field(default=None, gt=0, le=80)
    allowed: bool = True


class ChargePoint(Section):
    """A known charge point: its id, password, EVSEs, wiring and how it takes limits."""

    id: str = Field(..., min_length=1)
    password: str | None = Field(default=None,
                                 description="HTTP Basic auth (OCPP security profile 1)")
    evses: int = Field(default=1, ge=1, le=8)
    max_current_a: float = Field(default=32.0, gt=0, le=80)
    phases: Literal[1, 3] = 3
    phase: Literal["L1", "L2", "L3"] = "L1"
    limit_unit: Literal["A", "W"] = "A"


class OcppConfig(TlsFiles):
    """The OCPP central system; with tls_cert / tls_key it serves wss (security profile 2)."""

    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535)
    accept_unknown_charge_points: bool = Field(
        default=False, description="let charge points not in charge_points connect (the demo "
        "and the example config do; a real site lists its chargers)")
    max_connections: int = Field(default=1000, ge=1, description="charger connections at "
                                 "most; more are refused (HTTP 503)")
    max_failed_auth_per_minute: int = Field(default=20, ge=1, description="wrong passwords per "
                                            "address per minute before it is refused (429)")
    unknown_cards: Literal["accept", "reject"] = "accept"
    safe_limit_a: float = Field(default=6.0, ge=0, le=80,
                                description="TxDefaultProfile limit per charger")
    heartbeat_interval_s: int = Field(default=300, ge=1, le=86400)
    database: Path = Path("ocpp.db")
    charge_points: list[ChargePoint] = Field(default_factory=list)

    def resolve_paths(self, base: Path) -> None:
        """Make file paths (TLS files, the database) relative to the config file's folder."""
        self.resolve_tls_paths(base)
        self.database = resolve(base, self.database)

    def missing_files(self) -> list[ConfigProblem]:
        """Problems with files this section points to."""
        return self.missing_tls_files("ocpp")


def duplicate_ids(ocpp: OcppConfig, cards: Sequence[ChargeCard]) -> str | None:
    """What is listed twice among charge cards and charge points (None: nothing)."""
    tags = [c.id_tag for c in cards]
    if len(set(tags)) != len(tags):
        return "charge_cards: an id_tag is listed twice"
    cps = [c.id for c in ocpp.charge_points]
    if len(set(cps)) != len(cps):
        return "ocpp.charge_points: an id is listed twice"
    return None


class CdrTariff(Section):
    """What a kWh costs on a charge detail record.

    With a day-ahead price file: (day-ahead + markup + tax) x (1 + VAT) at the time of each
    meter reading (`sitekit.prices`); without one, the flat price.
    """

    csv: Path | None = None
    markup_eur_per_kwh: float = 0.0
    tax_eur_per_kwh: float = 0.0
    vat: float = Field(default=0.0, ge=0, le=1)
    flat_import_eur_per_kwh: float = 0.25


class OcppRmConfig(Section):
    """Everything the OCPP central system and its S2 RMs run on."""

    ocpp: OcppConfig = Field(default_factory=OcppConfig)
    charge_cards: list[ChargeCard] = Field(default_factory=list)
    ev_defaults: EvDefaults = Field(default_factory=EvDefaults)
    timezone: str = Field(default=DEFAULT_TIMEZONE,
                          description="IANA zone of local departure times and the logs")
    fuse_a: float | None = Field(default=None, gt=0,
                                 description="the site's fuse per phase: warns when the safe "
                                             "limits add up to more")
    tariff: CdrTariff = Field(default_factory=CdrTariff)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return iana_zone(value)

    @model_validator(mode="after")
    def _unique_ids(self) -> OcppRmConfig:
        twice = duplicate_ids(self.ocpp, self.charge_cards)
        if twice:
            raise ValueError(twice)
        return self
