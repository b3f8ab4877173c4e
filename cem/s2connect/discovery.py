"""DNS-SD for S2 Connect: the CEM announces itself, `cem pair discover` finds RMs.

Service type ``_s2connect._tcp``, subtype ``_cem`` (ours) or ``_rm`` (theirs), service name
the host name, TXT ``txtver=1``, ``e_name``, ``pairingUrl`` (and ``longpollingUrl`` in the
LAN, where client-only RMs long-poll us). The receiver must use the URL in the TXT record, not
the address DNS-SD resolved. On by default when the pairing API listens on a LAN address; off
on loopback (nothing to announce to).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("cem.s2connect.discovery")

SERVICE_TYPE = "_s2connect._tcp.local."
CEM_SUBTYPE = "_cem._sub." + SERVICE_TYPE
RM_SUBTYPE = "_rm._sub." + SERVICE_TYPE


def discovery_default(host: str) -> bool:
    """Announce by default unless the API listens on loopback only."""
    if host in ("", "0.0.0.0", "::"):
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def txt_record(*, pairing_url: str, endpoint_name: str | None,
               longpolling_url: str | None = None) -> dict[str, str]:
    """The spec's TXT keys (each value at most 255 bytes)."""
    record = {"txtver": "1", "pairingUrl": pairing_url}
    if endpoint_name:
        record["e_name"] = endpoint_name.encode("utf-8")[:255].decode("utf-8", "ignore")
    if longpolling_url:
        record["longpollingUrl"] = longpolling_url
    return record


@dataclass
class Found:
    """One endpoint seen through DNS-SD."""

    name: str
    pairing_url: str | None
    longpolling_url: str | None
    endpoint_name: str | None
    addresses: list[str]


class Announcer:
    """Publishes the CEM's pairing endpoint until stopped."""

    def __init__(self, *, instance: str, port: int, txt: dict[str, str],
                 addresses: list[str] | None = None) -> None:
        self.instance = instance
        self.port = port
        self.txt = txt
        self.addresses = addresses
        self._zc: Any = None
        self._infos: list[Any] = []

    async def start(self) -> None:
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        host = socket.gethostname().split(".")[0]
        name = f"{self.instance}.{SERVICE_TYPE}"
        addresses = self.addresses or _local_addresses()
        info = ServiceInfo(SERVICE_TYPE, name, port=self.port, properties=self.txt,
                           server=f"{host}.local.", parsed_addresses=addresses)
        self._zc = AsyncZeroconf()
        await self._zc.async_register_service(info)
        self._infos = [info]
        # python-zeroconf announces one type per name: answer the _cem subtype's PTR query
        # from the same instance too (RFC 6763 7.1)
        with contextlib.suppress(Exception):
            sub = ServiceInfo(CEM_SUBTYPE, name, port=self.port, properties=self.txt,
                              server=f"{host}.local.", parsed_addresses=addresses)
            self._zc.zeroconf.registry.types.setdefault(CEM_SUBTYPE.lower(), {})[sub.key] = sub
        logger.info("S2 Connect: announced as %s (DNS-SD %s)", name, CEM_SUBTYPE)

    async def stop(self) -> None:
        if self._zc is None:
            return
        with contextlib.suppress(Exception):
            self._zc.zeroconf.registry.types.pop(CEM_SUBTYPE.lower(), None)
            for info in self._infos:
                await self._zc.async_unregister_service(info)
        await self._zc.async_close()
        self._zc = None


def _local_addresses() -> list[str]:
    try:
        import ifaddr
    except ImportError:  # pragma: no cover
        return []
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(ip.ip)
    return out


async def discover(subtype: str = RM_SUBTYPE, timeout_s: float = 3.0) -> list[Found]:
    """Endpoints of `subtype` that answer within `timeout_s`."""
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf()
    names: set[str] = set()

    def changed(zeroconf: Any, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(zc.zeroconf, [subtype], handlers=[changed])
    try:
        await asyncio.sleep(timeout_s)
        found = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zc.zeroconf, 1500):
                continue
            props = {k.decode(): (v.decode() if v is not None else None)
                     for k, v in info.properties.items()}
            found.append(Found(name.removesuffix("." + SERVICE_TYPE), props.get("pairingUrl"),
                               props.get("longpollingUrl"), props.get("e_name"),
                               info.parsed_addresses()))
        return found
    finally:
        await browser.async_cancel()
        await zc.async_close()
