"""S2 Connect discovery over real multicast DNS-SD, and a client-only RM that long-polls
`waitForPairing` until the operator enters its code (`cem pair rm --node`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from test_s2connect import LAN, rm_node, site
from typer.testing import CliRunner

from cem.app.cli import app
from cem.app.service import CemService
from cem.s2connect.book import PairingBook
from cem.s2connect.discovery import CEM_SUBTYPE, RM_SUBTYPE, SERVICE_TYPE, discover
from sitekit import s2connect_client as client


@pytest.fixture
async def announced_cem(tmp_path: Path) -> AsyncIterator[CemService]:
    service = CemService(site(tmp_path, discovery=True, endpoint_name="Car park CEM"))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def test_the_cem_announces_its_pairing_url_over_dns_sd(announced_cem: CemService) -> None:
    found = []
    for _ in range(3):  # multicast answers may take a moment on a busy machine
        found = [f for f in await discover(CEM_SUBTYPE, timeout_s=2.0)
                 if f.pairing_url == announced_cem.s2connect.pairing_url]
        if found:
            break
    assert found, "the CEM's _cem._sub._s2connect._tcp announcement was not seen"
    assert found[0].endpoint_name == "Car park CEM"
    # LAN: client-only RMs learn where to long-poll from the TXT record
    assert found[0].longpolling_url == announced_cem.s2connect.pairing_url


async def test_pair_discover_lists_an_rm_that_announces_itself() -> None:
    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    name = f"wallbox-{uuid.uuid4().hex[:8]}"
    url = "https://192.0.2.10:4443/s2connect/"
    info = ServiceInfo(RM_SUBTYPE, f"{name}.{SERVICE_TYPE}", port=4443,
                       properties={"txtver": "1", "pairingUrl": url, "e_name": "Acme Wallbox"},
                       server=f"{name}.local.", parsed_addresses=["127.0.0.1"])
    zeroconf = AsyncZeroconf()
    await zeroconf.async_register_service(info)
    try:
        result = await asyncio.to_thread(CliRunner().invoke, app,
                                         ["pair", "discover", "--json", "--timeout", "3"])
    finally:
        await zeroconf.async_unregister_service(info)
        await zeroconf.async_close()
    assert result.exit_code == 0, result.output
    listed = {entry["pairing_url"]: entry for entry in json.loads(result.output)}
    assert url in listed, result.output
    assert listed[url]["endpoint_name"] == "Acme Wallbox"


async def test_a_client_only_rm_long_polls_until_its_code_is_entered(tmp_path: Path) -> None:
    service = CemService(site(tmp_path))
    await service.start()
    try:
        node = rm_node()
        rm_code = "Wb7Kq2mPz9R"  # what the RM shows on its display
        poll = service.s2connect.pairing_url + "v1/waitForPairing"
        item = {"clientNodeId": str(node.id), "clientNodeDescription": node.to_json(),
                "clientEndpointDescription": LAN.to_json()}
        async with httpx.AsyncClient(verify=False, timeout=30) as http:
            waiting = asyncio.create_task(http.post(poll, json=[item]))
            try:
                await asyncio.sleep(1.0)
                assert not waiting.done()  # nothing to do yet: the CEM holds the long poll
                entered = await asyncio.to_thread(
                    CliRunner().invoke, app, ["pair", "rm", "--node", str(node.id), "--code",
                                              rm_code, "--db", str(tmp_path / "cem.db")])
                assert entered.exit_code == 0, entered.output
                answer = await asyncio.wait_for(waiting, 10)
            finally:
                waiting.cancel()
            assert answer.status_code == 200
            assert answer.json() == [{"clientNodeId": str(node.id), "action": "requestPairing"}]
        # the RM pairs with the code it showed; a session opens with the pairing's tokens
        link = client.S2ConnectLink(tmp_path / "rm-pairing.json", node)
        await link.pair(service.s2connect.pairing_url, rm_code)
        row = await PairingBook(service.store).pairing(str(node.id))
        assert row is not None and row.state == "paired"
        ticket = await link.open_session()
        assert ticket.websocket_url.startswith("wss://")
    finally:
        await service.stop()
