"""S2 Connect 1.0.0 against a running CEM over real HTTPS and WSS on loopback.

Peers: our own RM client (sitekit.s2connect_client, resource_managers.base) and, as an
independent implementation, the `s2auth` package's pairing client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_rm_base_client import make_rm, running, until
from typer.testing import CliRunner

from cem.app.cli import app
from cem.app.service import CemService
from cem.s2connect.book import PairingBook
from cem.site.config import SiteConfig
from resource_managers.base import S2ResourceManager
from sitekit import s2connect as s2c
from sitekit import s2connect_client as client


def rm_node(role: str = "RM") -> s2c.NodeDescription:
    return s2c.NodeDescription(id=uuid.uuid4(), brand="Acme", type="EV charger",
                               modelName="Wallbox 3", role=role)  # type: ignore[arg-type]


LAN = s2c.EndpointDescription(name="Acme RM", deployment="LAN")


def site(tmp_path: Path, **s2connect: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "server": {"port": 0}, "store": {"path": str(tmp_path / "cem.db")},
        "http": {"port": 0},
        "s2connect": {"enabled": True, "port": 0, "websocket_port": 0, **s2connect}})


@pytest.fixture
async def cem(tmp_path: Path) -> AsyncIterator[CemService]:
    service = CemService(site(tmp_path))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def code(service: CemService) -> str:
    return await PairingBook(service.store).new_code()


async def paired(service: CemService, tmp_path: Path,
                 node: s2c.NodeDescription | None = None) -> client.S2ConnectLink:
    link = client.S2ConnectLink(tmp_path / "rm-pairing.json", node or rm_node())
    await link.pair(service.s2connect.pairing_url, await code(service))
    return link


# --- the formulas -----------------------------------------------------------------------------


def test_hmac_vectors_follow_the_spec_formulas() -> None:
    challenge = bytes(range(32))
    fingerprint = hashlib.sha256(b"a leaf certificate").digest()
    token = "Ab3dEf9hJk"
    lan = s2c.challenge_response(challenge, token, deployment="LAN", fingerprint=fingerprint)
    wan = s2c.challenge_response(challenge, token, deployment="WAN",
                                 domain="pairing.s2.example.com")
    # R = HMAC(C, T || F) and R = HMAC(C, T || D), T and D as ASCII, the key is the challenge
    assert lan == hmac.new(challenge, b"Ab3dEf9hJk" + fingerprint, hashlib.sha256).digest()
    assert wan == hmac.new(challenge, b"Ab3dEf9hJkpairing.s2.example.com",
                           hashlib.sha256).digest()
    assert base64.b64encode(lan).decode() == \
        base64.b64encode(hmac.new(challenge, token.encode("ascii") + fingerprint,
                                  "sha256").digest()).decode()
    # the token is not Base64-decoded: a token that happens to be valid Base64 still counts as text
    assert s2c.challenge_response(challenge, "QUJDRA", deployment="WAN", domain="x") == \
        hmac.new(challenge, b"QUJDRAx", hashlib.sha256).digest()
    # and s2auth, an independent implementation, computes the same
    from s2auth.common.hmac import hmac_response_lan, hmac_response_wan

    assert hmac_response_lan(token.encode(), challenge, fingerprint, hashlib.sha256) == lan
    assert hmac_response_wan(token.encode(), challenge, "pairing.s2.example.com",
                             hashlib.sha256) == wan


def test_codes_and_back_off() -> None:
    assert s2c.parse_pairing_code("A1-x7Kq2mPz9R") == ("A1", "x7Kq2mPz9R")
    assert s2c.parse_pairing_code("x7Kq2mPz9R") == (None, "x7Kq2mPz9R")
    with pytest.raises(ValueError):
        s2c.parse_pairing_code("ab-c")
    assert all(0 <= s2c.reconnect_delay(n) <= min(600, 2 * 2 ** n) for n in range(12))
    assert s2c.reconnect_delay(20, rand=lambda: 1.0) == 600


# --- pairing ---------------------------------------------------------------------------------------


async def test_an_rm_pairs_initiates_and_runs_an_frbc_session_over_wss(
        cem: CemService, tmp_path: Path) -> None:
    """pair -> initiateSession -> confirmAccessToken -> wss -> FRBC selected, no Handshake."""
    link = await paired(cem, tmp_path)
    record = link.file.load()
    assert record is not None and record.ca_pem and len(record.access_tokens) == 1
    assert (tmp_path / "rm-pairing.json").stat().st_mode & 0o777 == 0o600
    rm = make_rm("unused", s2connect=link)
    async with running(rm):
        await until(lambda: rm.connected.is_set(), 15)
        live = next(iter(cem.server.rms().values()))
        assert live.holder == f"s2connect:{link.node.id}"
        assert live.session.state.protocol_version == "v1.0.0"
        assert live.control_type == "FILL_RATE_BASED_CONTROL"
    await cem.store.flush()
    types = [r[0] for r in await cem.store.query("SELECT message_type FROM s2_messages")]
    assert "ResourceManagerDetails" in types and "Handshake" not in types
    rows = await PairingBook(cem.store).pairings()
    assert [r.rm_id for r in rows] == [str(rm.asset_details.resource_id)]
    # the token rotated: the one from pairing no longer opens a session
    assert link.file.load().access_tokens != record.access_tokens  # type: ignore[union-attr]


async def test_s2auth_pairs_and_initiates_a_session_with_the_cem(cem: CemService) -> None:
    """s2auth's pairing client (an independent implementation) against our server."""
    from s2auth.client.pairing_core import connect, perform_pairing
    from s2auth.common.model.s2_connect_common import NodeDescription, NodeId, Role

    class Memory:
        def __init__(self) -> None:
            self.data: dict[str, dict[str, Any]] = {}

        def store_connection_details(self, node: str, details: dict[str, Any]) -> None:
            self.data[node] = {**self.data.get(node, {}), **details}

        def load_connection_details(self, node: str) -> dict[str, Any] | None:
            return self.data.get(node)

        def remove_connection_details(self, node: str) -> bool:
            return self.data.pop(node, None) is not None

    storage = Memory()
    node_id = str(await PairingBook(cem.store).node_id())
    description = NodeDescription(id=NodeId(uuid.uuid4()), brand="s2auth", type="heat pump",
                                  modelName="reference", role=Role.RM)
    ok = await perform_pairing(
        cem.s2connect.pairing_url + "v1", await code(cem), storage, "RM", "LAN", ["v1.0.0"],
        ["WebSocket"], ["SHA256"], description, None, pairingS2NodeId=node_id, verify_tls=False)
    assert ok
    row = await PairingBook(cem.store).pairing(str(description.id.root))
    assert row is not None and row.state == "paired"
    assert await connect(storage, node_id)  # initiateSession + confirmAccessToken: 200
    assert storage.data[node_id]["selected_s2_message_version"] == "v1.0.0"


async def test_a_wrong_code_pairs_nothing_and_the_right_one_still_works(
        cem: CemService, tmp_path: Path) -> None:
    right = await code(cem)
    node = rm_node()
    with pytest.raises(client.S2ConnectError, match="does not match"):
        await client.pair(cem.s2connect.pairing_url, "Wrong0Code9", node=node, endpoint=LAN,
                          s2_versions=["v1.0.0"])
    assert await PairingBook(cem.store).pairings() == []
    pairing = await client.pair(cem.s2connect.pairing_url, right, node=node, endpoint=LAN,
                                s2_versions=["v1.0.0"])
    assert pairing.server_node["role"] == "CEM"
    # a dynamic code pairs once
    with pytest.raises(client.S2ConnectError, match="NoValidPairingTokenOnPairingServer"):
        await client.pair(cem.s2connect.pairing_url, right, node=rm_node(), endpoint=LAN,
                          s2_versions=["v1.0.0"])


async def test_bad_calls_get_the_spec_status_and_leave_nothing_half_paired(
        cem: CemService) -> None:
    url = cem.s2connect.pairing_url + "v1/"
    await code(cem)
    async with httpx.AsyncClient(verify=False, timeout=10) as http:
        assert (await http.get(cem.s2connect.pairing_url)).json() == ["v1"]
        bad = await http.post(url + "requestPairing", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["errorMessage"] == "ParsingError"
        body = {"clientNodeDescription": rm_node("CEM").to_json(),
                "clientEndpointDescription": LAN.to_json(),
                "supportedCommunicationProtocols": ["WebSocket"],
                "supportedS2MessageVersions": ["v1.0.0"], "supportedHmacHashingAlgorithms":
                ["SHA256"], "clientHmacChallenge": s2c.b64(bytes(32))}
        roles = await http.post(url + "requestPairing", json=body)
        assert roles.json()["errorMessage"] == "InvalidCombinationOfRoles"
        body["clientNodeDescription"] = rm_node().to_json()
        assert (await http.post(url + "requestPairing", json={**body, "nodeIdAlias": "Z9"})
                ).json()["errorMessage"] == "NodeNotFound"
        started = (await http.post(url + "requestPairing", json=body)).json()
        attempt = {"Authorization": f"Bearer {started['pairingAttemptId']}"}
        # out of order: finalize before the connection details ends the attempt
        assert (await http.post(url + "finalizePairing", json={"success": True},
                                headers=attempt)).status_code == 400
        assert (await http.post(url + "requestConnectionDetails", headers=attempt, json={
            "serverHmacChallengeResponse": s2c.b64(bytes(32))})).status_code == 401
        # unknown attempt, unknown node, no token
        assert (await http.post(url + "finalizePairing", json={"success": True}, headers={
            "Authorization": "Bearer " + "x" * 32})).status_code == 401
        assert (await http.post(url + "initiateSession", json={
            "clientNodeId": str(uuid.uuid4()), "serverNodeId": str(uuid.uuid4()),
            "supportedS2MessageVersions": ["v1.0.0"],
            "supportedCommunicationProtocols": ["WebSocket"]})).status_code == 401
        assert (await http.post(url + "confirmAccessToken")).status_code == 401
    assert await PairingBook(cem.store).pairings() == []


async def test_fifty_parallel_guesses_get_one_answer_a_second(cem: CemService) -> None:
    """The 1 s delay and one attempt at a time hold: answers come >= 1 s apart, the rest 503."""
    right = await code(cem)
    url = cem.s2connect.pairing_url + "v1/"
    answered: list[float] = []
    statuses: list[int] = []

    async def guess(http: httpx.AsyncClient) -> None:
        body = {"clientNodeDescription": rm_node().to_json(),
                "clientEndpointDescription": LAN.to_json(),
                "supportedCommunicationProtocols": ["WebSocket"],
                "supportedS2MessageVersions": ["v1.0.0"],
                "supportedHmacHashingAlgorithms": ["SHA256"],
                "clientHmacChallenge": s2c.b64(s2c.new_challenge())}
        reply = await http.post(url + "requestPairing", json=body)
        statuses.append(reply.status_code)
        if reply.status_code == 200:
            answered.append(time.monotonic())
            attempt = {"Authorization": f"Bearer {reply.json()['pairingAttemptId']}"}
            wrong = await http.post(url + "requestConnectionDetails", headers=attempt, json={
                "serverHmacChallengeResponse": s2c.b64(s2c.new_challenge())})
            statuses.append(wrong.status_code)

    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(verify=False, timeout=30, limits=limits) as http:
        await asyncio.gather(*(guess(http) for _ in range(50)))
    answered.sort()
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    assert len(answered) >= 2 and min(gaps) >= 0.95, gaps
    assert statuses.count(403) == len(answered)       # every guess that got a challenge failed
    assert statuses.count(503) == 50 - len(answered)  # the others were turned away at once
    assert await PairingBook(cem.store).pairings() == []
    pairing = await client.pair(cem.s2connect.pairing_url, right, node=rm_node(), endpoint=LAN,
                                s2_versions=["v1.0.0"])
    assert pairing.access_tokens


# --- tokens --------------------------------------------------------------------------------------------


async def _initiate(http: httpx.AsyncClient, api: str, record: client.Pairing,
                    token: str) -> httpx.Response:
    return await http.post(api + "initiateSession", headers={"Authorization": f"Bearer {token}"},
                           json={"clientNodeId": record.client_node_id,
                                 "serverNodeId": record.server_node_id,
                                 "supportedS2MessageVersions": ["v1.0.0"],
                                 "supportedCommunicationProtocols": ["WebSocket"]})


async def test_token_rotation_survives_a_lost_confirm_response(cem: CemService,
                                                               tmp_path: Path) -> None:
    link = await paired(cem, tmp_path)
    record = link.file.load()
    assert record is not None
    first = record.access_tokens[0]
    api = record.initiate_session_url + "v1/"  # type: ignore[operator]
    async with httpx.AsyncClient(verify=client.pinned_context(record.ca_pem), timeout=10) as http:
        pending = (await _initiate(http, api, record, first)).json()["accessToken"]
        confirm = await http.post(api + "confirmAccessToken",
                                  headers={"Authorization": f"Bearer {pending}"})
        assert confirm.status_code == 200 and confirm.json()["websocketUrl"].startswith("wss://")
        # ... but the response was lost: the client still holds both tokens
        record.access_tokens = [first, pending]
        link.file.save(record)
        # a replayed pending token and the old active token are refused
        assert (await http.post(api + "confirmAccessToken",
                                headers={"Authorization": f"Bearer {pending}"})).status_code == 401
        assert (await _initiate(http, api, record, first)).status_code == 401
    ticket = await link.open_session()   # tries the newest first: pending is the active one now
    assert ticket.websocket_url.startswith("wss://")
    after = link.file.load()
    assert after is not None and len(after.access_tokens) == 1
    assert after.access_tokens[0] not in (first, pending)


async def test_a_late_pending_token_is_refused_and_the_old_one_still_works(
        cem: CemService, tmp_path: Path) -> None:
    link = await paired(cem, tmp_path)
    record = link.file.load()
    assert record is not None
    active = record.access_tokens[0]
    api = record.initiate_session_url + "v1/"  # type: ignore[operator]
    service = cem.s2connect.service
    async with httpx.AsyncClient(verify=client.pinned_context(record.ca_pem), timeout=10) as http:
        pending = (await _initiate(http, api, record, active)).json()["accessToken"]
        service.clock = lambda: time.time() + 16      # the client waited too long
        assert (await http.post(api + "confirmAccessToken",
                                headers={"Authorization": f"Bearer {pending}"})).status_code == 401
        service.clock = time.time
        assert (await _initiate(http, api, record, active)).status_code == 200


async def test_a_websocket_token_opens_one_session_only(cem: CemService, tmp_path: Path) -> None:
    import websockets

    link = await paired(cem, tmp_path)
    ticket = await link.open_session()
    headers = {"Authorization": f"Bearer {ticket.websocket_token}"}
    async with websockets.connect(ticket.websocket_url, ssl=ticket.ssl_context,
                                  additional_headers=headers):
        pass
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ticket.websocket_url, ssl=ticket.ssl_context,
                                      additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401


# --- unpairing and trust -------------------------------------------------------------------------------


async def test_the_rm_unpairs_itself(cem: CemService, tmp_path: Path) -> None:
    link = await paired(cem, tmp_path)
    record = link.file.load()
    await link.unpair()
    assert not link.file.path.exists()
    row = await PairingBook(cem.store).pairing(str(link.node.id))
    assert row is not None and row.state == "unpaired" and row.unpaired_by == "rm"
    with pytest.raises(client.NoLongerPaired):
        await client.open_session(record, lambda p: None)  # type: ignore[arg-type]


async def test_the_cem_unpairs_and_the_live_session_ends(cem: CemService, tmp_path: Path) -> None:
    link = await paired(cem, tmp_path)
    rm: S2ResourceManager = make_rm("unused", s2connect=link)
    stop = asyncio.Event()
    task = asyncio.create_task(rm.run(stop))
    try:
        await until(lambda: rm.connected.is_set(), 15)
        result = await asyncio.to_thread(CliRunner().invoke, app, [
            "pair", "remove", str(link.node.id), "--db", str(cem.config.store.path)])
        assert result.exit_code == 0, result.output
        await asyncio.wait_for(task, 15)   # RECONNECT, then initiateSession: NoLongerPaired
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 10)
    assert not rm.connected.is_set()
    assert "unpaired" in (rm.last_error or "")
    assert not link.file.path.exists()


async def test_a_swapped_certificate_is_refused_after_pairing(tmp_path: Path) -> None:
    config = site(tmp_path)
    service = CemService(config)
    await service.start()
    try:
        link = await paired(service, tmp_path)
        port = service.s2connect.api_port
    finally:
        await service.stop()
    before = link.file.load()
    shutil.rmtree(tmp_path / "s2connect-tls")           # a new CA and leaf: someone else
    config.s2connect.port = port
    service = CemService(config)
    await service.start()
    try:
        with pytest.raises(client.S2ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await link.open_session()
    finally:
        await service.stop()
    assert link.file.load() == before                   # no token was offered, none lost


# --- the command line ------------------------------------------------------------------------------


def test_pair_code_json_and_mistakes(tmp_path: Path) -> None:
    import json

    db = str(tmp_path / "cem.db")
    shown = CliRunner().invoke(app, ["pair", "code", "--json", "--db", db])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert set(data) >= {"pairing_code", "pairing_url", "node_id"}
    assert len(data["pairing_code"]) >= 10 and data["pairing_code"].isalnum()
    assert data["pairing_url"].startswith("https://") and data["pairing_url"].endswith("/")
    again = json.loads(CliRunner().invoke(app, ["pair", "code", "--json", "--db", db]).stdout)
    assert again["node_id"] == data["node_id"] and again["pairing_code"] != data["pairing_code"]
    missing = CliRunner().invoke(app, ["pair", "remove", "nobody", "--db", db])
    assert missing.exit_code == 2 and "no paired RM" in missing.output
    bad = CliRunner().invoke(app, ["pair", "rm", "--url", "https://127.0.0.1:1/", "--code", "a-b",
                                   "--db", db])
    assert bad.exit_code == 2
