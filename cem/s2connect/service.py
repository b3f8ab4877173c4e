"""The CEM's S2 Connect server logic: pairing, session initiation, unpairing, websocket tokens.

Each API call is one method returning a `Reply` (status + JSON body); the HTTPS edge
(`cem/app/s2connect_api.py`) only maps routes to them. What holds here:

- **requestPairing**: one at a time for our node, each answer no sooner than 1 s after the
  attempt was taken up, at most `MAX_QUEUED` waiting (more: 503, as the API allows), so 50
  parallel guesses get at most one answer a second, and each answer allows one online guess.
- **access tokens** rotate on every session: initiateSession checks the active token (stored
  as a SHA-256 only) and issues a pending one; confirmAccessToken (within 15 s) makes it the
  only active token and hands out a single-use websocket token (30 s, in memory). A replayed or
  late pending token, an old active token, an unknown node: 401; an unpaired node: 400
  NoLongerPaired.
- **unpairing**: by the RM (/unpair with its token) or by the operator (`cem pair remove`,
  maybe in another process: a watcher sees it in the store within a second); the live session
  is asked to RECONNECT and closed.
- **the websocket**: `authorizer` lets a connection in only with a fresh websocket token and
  starts its session in S2 Connect mode (no Handshake) with the negotiated S2 JSON version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import ValidationError
from websockets.http11 import Request

from cem.ports import Connected, RegistryEvent, RmDetails, RmEvent
from cem.s2.server import AuthDecision, RmAuthorizer, S2Server
from cem.s2connect.book import PairingBook
from cem.s2connect.pairing import PairingCore, Reply, pairing_error
from sitekit.s2connect import (
    COMMUNICATION_PROTOCOLS,
    PENDING_TOKEN_S,
    REQUEST_PAIRING_DELAY_S,
    WEBSOCKET_TOKEN_S,
    CancelPreparePairingRequest,
    EndpointDescription,
    InitiateSessionRequest,
    NodeDescription,
    PreparePairingRequest,
    UnpairRequest,
    WaitForPairingItem,
    new_access_token,
    same_bytes,
    same_subnet,
    select_version,
    token_hash,
)

logger = logging.getLogger("cem.s2connect")

S2_JSON_VERSIONS: tuple[str, ...] = ("v1.0.0", "v0.0.2-beta")
"""S2 JSON versions this CEM speaks in S2 Connect mode, preferred first."""
MAX_QUEUED = 4
LONG_POLL_S = 20.0   # the spec: answer within 25 s
HOLDER_PREFIX = "s2connect:"


def communication_error(kind: str, info: str) -> Reply:
    return Reply(400, {"errorMessage": kind, "additionalInfo": info})


@dataclass
class Urls:
    pairing: str      # https://host:port/s2connect/  (also the session API's base)
    session: str
    websocket: str    # wss://host:port


class WebsocketTokens:
    """Single-use websocket tokens (kept as hashes, 30 s), by paired node."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, str, float]] = {}

    def issue(self, node_id: str, s2_version: str, now: float) -> str:
        token = new_access_token()
        self._tokens[token_hash(token)] = (node_id, s2_version, now + WEBSOCKET_TOKEN_S)
        return token

    def take(self, token: str, now: float) -> tuple[str, str] | None:
        entry = self._tokens.pop(token_hash(token), None)
        for key, (_, _, until) in list(self._tokens.items()):
            if until < now:
                del self._tokens[key]
        if entry is None or entry[2] < now:
            return None
        return entry[0], entry[1]

    def revoke(self, node_id: str) -> None:
        for key, (node, _, _) in list(self._tokens.items()):
            if node == node_id:
                del self._tokens[key]


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


class S2ConnectAuthorizer:
    """Websocket upgrades on the S2 Connect listener: a fresh websocket token, nothing else."""

    def __init__(self, tokens: WebsocketTokens, clock: Callable[[], float] = time.time) -> None:
        self.tokens = tokens
        self.clock = clock

    @property
    def describe(self) -> str:
        return "S2 Connect: single-use websocket tokens from confirmAccessToken"

    def authorize(self, request: Request, peer: str) -> AuthDecision:
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            return AuthDecision(False, reason="no bearer websocket token")
        found = self.tokens.take(token, self.clock())
        if found is None:
            return AuthDecision(False, reason="unknown, used or expired websocket token")
        node_id, version = found
        return AuthDecision(True, holder=HOLDER_PREFIX + node_id, setup=_s2connect_mode(version))


def _s2connect_mode(version: str) -> Callable[[Any], None]:
    def setup(session: Any) -> None:
        session.start_s2connect(version)
    return setup


class PlainModeClosed:
    """The Handshake + bearer-token listener when `s2connect.plain_mode` is false."""

    describe = "plain mode closed: pair with S2 Connect"

    def authorize(self, request: Request, peer: str) -> AuthDecision:
        return AuthDecision(False, reason="plain mode is closed on this CEM: pair the RM with "
                            "S2 Connect")


class S2ConnectService:
    """The server side of S2 Connect for one CEM node (see the module docstring)."""

    def __init__(self, book: PairingBook, node: NodeDescription, endpoint: EndpointDescription,
                 urls: Urls, *, fingerprint: bytes | None, domain: str | None,
                 ws_tokens: WebsocketTokens | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.node = node
        self.endpoint = endpoint
        self.urls = urls
        self.deployment = endpoint.deployment or "LAN"
        self.clock = clock
        self.core = PairingCore(node, endpoint, fingerprint=fingerprint, domain=domain,
                                session_url=urls.session, s2_versions=S2_JSON_VERSIONS)
        self.ws_tokens = ws_tokens or WebsocketTokens()
        self.authorizer: RmAuthorizer = S2ConnectAuthorizer(self.ws_tokens, clock)
        self.server: S2Server | None = None
        self._lock = asyncio.Lock()
        self._queued = 0
        self._holders: dict[str, str] = {}      # connection id -> paired node id
        self._pollers: dict[str, WaitForPairingItem] = {}
        self._signalled: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.answered_pairing_requests = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def attach(self, server: S2Server) -> None:
        """Use `server` to end sessions of unpaired nodes and learn their resource ids."""
        self.server = server
        server.add_listener(self._on_registry_event)

    async def start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch_unpairing(),
                                                               name="s2connect-unpair-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    # --- pairing ---------------------------------------------------------------------------------

    async def request_pairing(self, raw: Any) -> Reply:
        """One attempt at a time for our node, each answer 1 s after it was taken up."""
        if self._queued >= MAX_QUEUED:
            return Reply(503)
        self._queued += 1
        try:
            async with self._lock:
                began = time.monotonic()
                try:
                    client_id = str(raw["clientNodeDescription"]["id"])
                except (KeyError, TypeError):
                    client_id = None
                token = await self.book.valid_token(client_id, self.clock())
                reply = self.core.request_pairing(raw, token, self.clock())
                await asyncio.sleep(max(0.0, began + REQUEST_PAIRING_DELAY_S - time.monotonic()))
                self.answered_pairing_requests += 1
                return reply
        finally:
            self._queued -= 1

    def request_connection_details(self, attempt_id: str | None, raw: Any) -> Reply:
        reply = self.core.request_connection_details(attempt_id, raw, self.clock())
        if reply.status == 403:
            logger.warning("S2 Connect: a pairing attempt answered our challenge wrongly "
                           "(wrong pairing code?)")
        return reply

    def post_connection_details(self, attempt_id: str | None, raw: Any) -> Reply:
        return self.core.post_connection_details(attempt_id, raw, self.clock())

    async def finalize(self, attempt_id: str | None, raw: Any) -> Reply:
        reply, attempt = self.core.finalize(attempt_id, raw, self.clock())
        if attempt is None:
            return reply
        try:
            assert attempt.access_token is not None
            node_id = str(attempt.client.id)
            await self.book.save_pairing(attempt.client, attempt.client_endpoint,
                                         token_hash(attempt.access_token), now=self.clock())
            await self.book.consume(attempt.token, node_id)
        except Exception:
            logger.exception("S2 Connect: could not store a pairing; it did not happen")
            return Reply(503)
        finally:
            self.core.forget(attempt)
        self._signalled.discard(node_id)
        logger.info("S2 Connect: paired with RM %s (%s %s)", node_id, attempt.client.brand,
                    attempt.client.modelName)
        await self._end_sessions(node_id, "paired again")
        return reply

    # --- LAN-only calls ------------------------------------------------------------------------

    def lan_only(self, peer: str) -> Reply | None:
        """404 on a WAN endpoint, 401 from outside our subnets, None: go on."""
        if self.deployment != "LAN":
            return Reply(404)
        if not same_subnet(peer):
            return Reply(401)
        return None

    def endpoint_description(self) -> Reply:
        return Reply(200, self.endpoint.to_json())

    def nodes(self) -> Reply:
        return Reply(200, [self.node.to_json()])

    def prepare_pairing(self, raw: Any) -> Reply:
        try:
            request = PreparePairingRequest.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            return pairing_error("ParsingError", str(exc)[:300])
        if request.serverNodeId != self.node.id:
            return pairing_error("NodeNotFound", f"no node {request.serverNodeId} here")
        if request.clientNodeDescription.role == self.node.role:
            return pairing_error("InvalidCombinationOfRoles", "this node is a CEM")
        d = request.clientNodeDescription
        logger.info("S2 Connect: %s %s (%s) is about to pair: show a code with "
                    "`cem pair code`", d.brand, d.modelName, d.id)
        return Reply(204)

    def cancel_prepare_pairing(self, raw: Any) -> Reply:
        with contextlib.suppress(ValidationError, ValueError):
            CancelPreparePairingRequest.model_validate(raw)
        return Reply(204)

    async def wait_for_pairing(self, raw: Any) -> Reply:
        """Long-polling by client-only RMs: tell one to pair when its code was entered here."""
        try:
            if not isinstance(raw, list) or not raw:
                raise ValueError("a non-empty list of nodes")
            items = [WaitForPairingItem.model_validate(i) for i in raw]
        except (ValidationError, ValueError):
            return Reply(400)
        deadline = time.monotonic() + LONG_POLL_S
        while True:
            actions = []
            for item in items:
                node = str(item.clientNodeId)
                known = self._pollers.get(node)
                if item.clientNodeDescription is not None:
                    self._pollers[node] = item
                    d = item.clientNodeDescription
                    if known is None:
                        logger.info("S2 Connect: RM %s (%s %s) waits to be paired: "
                                    "`cem pair rm --node %s --code CODE`", node, d.brand,
                                    d.modelName, node)
                elif known is None:
                    actions.append({"clientNodeId": node, "action": "sendNodeDescription"})
                    continue
                if item.errorMessage is not None:
                    logger.warning("S2 Connect: RM %s has no valid pairing code now", node)
                    self._signalled.discard(node)
                    continue
                if node not in self._signalled and await self.book.entered_for(node) is not None:
                    self._signalled.add(node)
                    actions.append({"clientNodeId": node, "action": "requestPairing"})
            if actions:
                return Reply(200, actions)
            if time.monotonic() >= deadline:
                return Reply(204)
            await asyncio.sleep(0.5)

    # --- session initiation ---------------------------------------------------------------------

    async def initiate_session(self, token: str | None, raw: Any) -> Reply:
        try:
            request = InitiateSessionRequest.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            return communication_error("ParsingError", str(exc)[:300])
        node_id = str(request.clientNodeId)
        row = await self.book.pairing(node_id)
        if row is not None and row.state == "unpaired":
            return communication_error("NoLongerPaired", "this CEM unpaired the node")
        if request.serverNodeId != self.node.id or row is None or token is None \
                or row.token_hash is None or not same_bytes(token_hash(token).encode(),
                                                            row.token_hash.encode()):
            return Reply(401)
        if not set(request.supportedCommunicationProtocols) & set(COMMUNICATION_PROTOCOLS):
            return communication_error("IncompatibleCommunicationProtocols",
                                       "this CEM speaks WebSocket")
        version = select_version(request.supportedS2MessageVersions, S2_JSON_VERSIONS)
        if version is None:
            return communication_error("IncompatibleS2MessageVersions",
                                       f"this CEM speaks {', '.join(S2_JSON_VERSIONS)}")
        if request.clientNodeDescription is not None \
                and request.clientNodeDescription.id == request.clientNodeId:
            await self.book.update_description(request.clientNodeDescription)
        pending = new_access_token()
        try:
            await self.book.add_pending(node_id, token_hash(pending), version, self.clock())
        except Exception:
            logger.exception("S2 Connect: could not store a pending token")
            return communication_error("Other", "the CEM cannot store tokens now; retry later")
        return Reply(200, {"selectedCommunicationProtocol": "WebSocket",
                           "selectedS2MessageVersion": version, "accessToken": pending,
                           "serverNodeDescription": self.node.to_json(),
                           "serverEndpointDescription": self.endpoint.to_json()})

    async def confirm_access_token(self, token: str | None) -> Reply:
        if token is None:
            return Reply(401)
        hashed = token_hash(token)
        try:
            pending = await self.book.take_pending(hashed)
            if pending is None:
                return Reply(401)
            node_id, version, issued = pending
            if self.clock() - issued > PENDING_TOKEN_S:
                return Reply(401)
            if not await self.book.activate(node_id, hashed, self.clock()):
                return Reply(401)
        except Exception:
            logger.exception("S2 Connect: could not activate an access token")
            return Reply(500)
        websocket_token = self.ws_tokens.issue(node_id, version, self.clock())
        return Reply(200, {"communicationProtocol": "WebSocket",
                           "websocketToken": websocket_token,
                           "websocketUrl": self.urls.websocket})

    async def unpair(self, token: str | None, raw: Any) -> Reply:
        try:
            request = UnpairRequest.model_validate(raw)
        except (ValidationError, ValueError):
            return Reply(400)
        node_id = str(request.clientNodeId)
        row = await self.book.pairing(node_id)
        if request.serverNodeId != self.node.id or row is None or row.state != "paired" \
                or token is None or row.token_hash is None \
                or not same_bytes(token_hash(token).encode(), row.token_hash.encode()):
            return Reply(401)
        await self.book.unpair(node_id, "rm", self.clock())
        logger.info("S2 Connect: RM %s unpaired itself", node_id)
        self.ws_tokens.revoke(node_id)
        await self._end_sessions(node_id, "unpaired")
        return Reply(204)

    # --- sessions of paired nodes ----------------------------------------------------------------

    async def _end_sessions(self, node_id: str, reason: str) -> int:
        """Ask every live session of `node_id` to reconnect, and close it."""
        if self.server is None:
            return 0
        ended = 0
        for connection_id, node in list(self._holders.items()):
            if node == node_id:
                ended += await self.server.reconnect(connection_id, reason)
        return ended

    def _on_registry_event(self, event: RegistryEvent) -> Any:
        if isinstance(event, Connected):
            if event.holder and event.holder.startswith(HOLDER_PREFIX):
                self._holders[event.connection_id] = event.holder[len(HOLDER_PREFIX):]
        elif isinstance(event, RmEvent):
            node = self._holders.get(event.connection_id)
            if node is not None and isinstance(event.event, RmDetails) and event.rm_id:
                return self.book.set_rm_id(node, event.rm_id)
        else:
            self._holders.pop(event.connection_id, None)
        return None

    async def _watch_unpairing(self) -> None:
        """End sessions of nodes the operator unpaired (maybe from another process)."""
        since = self.clock()
        while True:
            await asyncio.sleep(1.0)
            try:
                for node_id, at in await self.book.unpaired_since(since):
                    since = max(since, at)
                    self.ws_tokens.revoke(node_id)
                    if await self._end_sessions(node_id, "unpaired by the CEM"):
                        logger.info("S2 Connect: ended the session of unpaired RM %s", node_id)
            except Exception:
                logger.exception("S2 Connect: checking for unpaired nodes failed")


def node_description(node_id: UUID, site_name: str) -> NodeDescription:
    return NodeDescription(id=node_id, brand="S2 CEM", type="Customer Energy Manager",
                           modelName="s2-cem", userDefinedName=site_name, role="CEM")
