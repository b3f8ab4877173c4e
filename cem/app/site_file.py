"""The site file: one TOML for the whole deployment, the CEM's sections next to its RMs'.

Each part declares its own sections: the CEM (`cem.site.config.SiteConfig`: `[site]`,
`[server]`, `[grid]`, `[prices]`, `[planner]`, ...), the OCPP central system
(`resource_managers.ocpp_charger.config`: `[ocpp]`, `[[charge_cards]]`) and the Modbus RMs
(`resource_managers.modbus.config`: `[[modbus.devices]]`). `SiteFile` composes them, so one
validation reports every problem of every section at once, with its line and a hint, and unknown
keys stay errors. Each command takes its part: `cem run` the CEM's (a `SiteFile` is a
`SiteConfig`), `cem rm ocpp` / `cem sim chargers` `ocpp_rm()`, `cem rm modbus` / `cem sim
modbus` `modbus`, `cem demo` and `cem simulate` all of it.

A new RM family with settings adds its section model in its package and one field here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from cem.site.config import SiteConfig, check_referenced_files, resolve_paths
from resource_managers.modbus.config import ModbusConfig
from resource_managers.ocpp_charger.config import (
    CdrTariff,
    ChargeCard,
    OcppConfig,
    OcppRmConfig,
    duplicate_ids,
)
from sitekit.config import ConfigProblem, config_folder, read_config_text, validate_toml


class SiteFile(SiteConfig):
    """The CEM's sections plus those of the resource managers that run beside it."""

    charge_cards: list[ChargeCard] = Field(default_factory=list)
    ocpp: OcppConfig = Field(default_factory=OcppConfig)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> SiteFile:
        twice = duplicate_ids(self.ocpp, self.charge_cards)
        if twice:
            raise ValueError(twice)
        return self

    def ocpp_rm(self) -> OcppRmConfig:
        """What the OCPP central system runs on: its sections plus the site's EV defaults,
        time zone, fuse and tariff (for CDR costs). Shares the section objects, not copies."""
        prices = self.prices
        return OcppRmConfig(
            ocpp=self.ocpp, charge_cards=self.charge_cards, ev_defaults=self.ev_defaults,
            timezone=self.site.timezone, fuse_a=self.grid.fuse_a,
            tariff=CdrTariff(csv=prices.csv, markup_eur_per_kwh=prices.markup_eur_per_kwh,
                             tax_eur_per_kwh=prices.tax_eur_per_kwh, vat=prices.vat,
                             flat_import_eur_per_kwh=prices.flat_import_eur_per_kwh))

    def resolve_paths(self, base: Path) -> SiteFile:
        """Relative paths in every section are relative to the file's folder."""
        resolve_paths(self, base)
        self.ocpp.resolve_paths(base)
        self.modbus.resolve_paths(base)
        return self

    def file_problems(self) -> list[ConfigProblem]:
        """Files the sections point to that do not exist (prices, TLS files, register maps)."""
        return check_referenced_files(self) + self.ocpp.missing_files() + self.modbus.missing_files()


def parse_site_file(text: str, file: Path = Path("<string>")) -> SiteFile:
    """Parse TOML text into a SiteFile, or raise ConfigError listing every problem."""
    return validate_toml(text, SiteFile, file).resolve_paths(config_folder(file))


def load_site_file(file: Path) -> SiteFile:
    """Read and validate a site file; raise ConfigError on any problem."""
    return parse_site_file(read_config_text(file), file)
