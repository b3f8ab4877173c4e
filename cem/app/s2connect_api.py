"""The S2 Connect HTTPS API of `cem run` (Starlette on uvicorn), and how it is started.

Routes (one base for the pairing and the session-initiation API: both are v1 and their paths
do not overlap, and some clients, s2auth's among them, expect them together):

    GET  /s2connect/                                  ["v1"]
    POST /s2connect/v1/requestPairing | requestConnectionDetails | postConnectionDetails
                       | finalizePairing              pairing (attempt id as Bearer)
    GET  /s2connect/v1/endpoint | nodes               LAN only (401 outside our subnets)
    POST /s2connect/v1/preparePairing | cancelPreparePairing | waitForPairing   LAN only
    POST /s2connect/v1/initiateSession | confirmAccessToken | unpair  (access token as Bearer)

Every rule lives in `cem.s2connect.service`; this module parses JSON, reads the Bearer header
and the peer, and writes the `Reply`. TLS comes from `cem.s2connect.tls` (CA + leaf, made on
first run next to the store); the S2 websocket of paired RMs is a second listener of the S2
server with the same certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cem.s2.server import S2Server
from cem.s2connect.book import PairingBook
from cem.s2connect.discovery import Announcer, discovery_default, txt_record
from cem.s2connect.pairing import Reply, pairing_error
from cem.s2connect.service import (
    PlainModeClosed,
    S2ConnectService,
    Urls,
    bearer,
    communication_error,
    node_description,
)
from cem.s2connect.tls import TlsMaterial, default_names, ensure_tls
from cem.site.config import SiteConfig
from cem.store import Store
from sitekit.net import bind_tcp
from sitekit.s2connect import API_VERSION, EndpointDescription

logger = logging.getLogger("cem.s2connect")

BASE = "/s2connect/"
MAX_BODY = 65536


class _NotJson(Exception):
    pass


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise _NotJson("body too large")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _NotJson(str(exc)) from exc


def _respond(reply: Reply) -> Response:
    if reply.body is None:
        return Response(status_code=reply.status)
    return JSONResponse(reply.body, status_code=reply.status)


def build_app(get_service: Callable[[], S2ConnectService | None]) -> Starlette:
    """The ASGI app; `get_service` gives the service (None until it is ready: 503)."""

    def handler(fn: Callable[[S2ConnectService, Request], Awaitable[Reply]],
                *, parse_error: Callable[[str], Reply]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            service = get_service()
            if service is None:
                return Response(status_code=503)
            try:
                return _respond(await fn(service, request))
            except _NotJson as exc:
                return _respond(parse_error(f"not JSON: {exc}"[:200]))
            except Exception:
                logger.exception("S2 Connect API: %s failed", request.url.path)
                return JSONResponse({"errorMessage": "Other", "additionalInfo": "CEM error"},
                                    status_code=500)
        return endpoint

    def pairing_parse(info: str) -> Reply:
        return pairing_error("ParsingError", info)

    def session_parse(info: str) -> Reply:
        return communication_error("ParsingError", info)

    def plain_400(info: str) -> Reply:
        return Reply(400)

    def attempt(request: Request) -> str | None:
        return bearer(request.headers.get("authorization"))

    def peer(request: Request) -> str:
        return request.client.host if request.client is not None else ""

    async def versions(service: S2ConnectService, request: Request) -> Reply:
        return Reply(200, [API_VERSION])

    async def request_pairing(service: S2ConnectService, request: Request) -> Reply:
        return await service.request_pairing(await _body(request))

    async def request_details(service: S2ConnectService, request: Request) -> Reply:
        return service.request_connection_details(attempt(request), await _body(request))

    async def post_details(service: S2ConnectService, request: Request) -> Reply:
        return service.post_connection_details(attempt(request), await _body(request))

    async def finalize(service: S2ConnectService, request: Request) -> Reply:
        return await service.finalize(attempt(request), await _body(request))

    async def endpoint_info(service: S2ConnectService, request: Request) -> Reply:
        return service.lan_only(peer(request)) or service.endpoint_description()

    async def nodes(service: S2ConnectService, request: Request) -> Reply:
        return service.lan_only(peer(request)) or service.nodes()

    async def prepare(service: S2ConnectService, request: Request) -> Reply:
        return service.lan_only(peer(request)) or service.prepare_pairing(await _body(request))

    async def cancel(service: S2ConnectService, request: Request) -> Reply:
        refusal = service.lan_only(peer(request))
        return refusal or service.cancel_prepare_pairing(await _body(request))

    async def wait(service: S2ConnectService, request: Request) -> Reply:
        refusal = service.lan_only(peer(request))
        return refusal or await service.wait_for_pairing(await _body(request))

    async def initiate(service: S2ConnectService, request: Request) -> Reply:
        return await service.initiate_session(attempt(request), await _body(request))

    async def confirm(service: S2ConnectService, request: Request) -> Reply:
        return await service.confirm_access_token(attempt(request))

    async def unpair(service: S2ConnectService, request: Request) -> Reply:
        return await service.unpair(attempt(request), await _body(request))

    v1 = BASE + API_VERSION + "/"
    routes = [
        Route(BASE, handler(versions, parse_error=plain_400), methods=["GET"]),
        Route(v1 + "requestPairing", handler(request_pairing, parse_error=pairing_parse),
              methods=["POST"]),
        Route(v1 + "requestConnectionDetails", handler(request_details, parse_error=plain_400),
              methods=["POST"]),
        Route(v1 + "postConnectionDetails", handler(post_details, parse_error=plain_400),
              methods=["POST"]),
        Route(v1 + "finalizePairing", handler(finalize, parse_error=plain_400), methods=["POST"]),
        Route(v1 + "endpoint", handler(endpoint_info, parse_error=plain_400), methods=["GET"]),
        Route(v1 + "nodes", handler(nodes, parse_error=plain_400), methods=["GET"]),
        Route(v1 + "preparePairing", handler(prepare, parse_error=pairing_parse),
              methods=["POST"]),
        Route(v1 + "cancelPreparePairing", handler(cancel, parse_error=plain_400),
              methods=["POST"]),
        Route(v1 + "waitForPairing", handler(wait, parse_error=plain_400), methods=["POST"]),
        Route(v1 + "initiateSession", handler(initiate, parse_error=session_parse),
              methods=["POST"]),
        Route(v1 + "confirmAccessToken", handler(confirm, parse_error=plain_400),
              methods=["POST"]),
        Route(v1 + "unpair", handler(unpair, parse_error=plain_400), methods=["POST"]),
    ]
    return Starlette(routes=routes)


class _Uvicorn(uvicorn.Server):
    """uvicorn inside the CEM's loop: `cem run` handles SIGINT/SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def url_host(config: SiteConfig) -> str:
    """The host name in our URLs: the WAN domain, a LAN mDNS name, or the loopback address."""
    s2c = config.s2connect
    if s2c.domain:
        return s2c.domain
    if not discovery_default(s2c.host):
        return "127.0.0.1" if s2c.host in ("localhost", "127.0.0.1") else s2c.host
    if s2c.host in ("", "0.0.0.0", "::"):
        return socket.gethostname().split(".")[0] + ".local"
    return s2c.host


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def tls_folder(config: SiteConfig) -> Path:
    if config.s2connect.tls_dir is not None:
        return config.s2connect.tls_dir
    return Path(config.store.path).resolve().parent / "s2connect-tls"


def load_tls(config: SiteConfig) -> TlsMaterial:
    host = url_host(config)
    return ensure_tls(tls_folder(config), default_names((config.s2connect.host, host)),
                      label=config.site.name)


@dataclass
class S2ConnectEdge:
    """The running S2 Connect parts of `cem run`."""

    service: S2ConnectService
    tls: TlsMaterial
    api_port: int
    websocket_port: int
    _uvicorn: _Uvicorn
    _task: asyncio.Task[None]
    _announcer: Announcer | None = None

    @property
    def pairing_url(self) -> str:
        return self.service.urls.pairing

    async def stop(self) -> None:
        if self._announcer is not None:
            with contextlib.suppress(Exception):
                await self._announcer.stop()
        await self.service.stop()
        self._uvicorn.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        except (TimeoutError, Exception):
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self.service.book.set_pairing_url(None)


async def start_s2connect(config: SiteConfig, store: Store, server: S2Server) -> S2ConnectEdge:
    """Certificates, the wss listener, the HTTPS API and (in the LAN) DNS-SD.

    Raises OSError (address in use), ssl.SSLError or ValueError (unusable TLS files).
    """
    s2c = config.s2connect
    tls = await asyncio.to_thread(load_tls, config)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.chain), str(tls.leaf_key))
    book = PairingBook(store)
    node_id = await book.node_id()
    holder: list[S2ConnectService] = []
    api_socket = bind_tcp(s2c.host, s2c.port, backlog=128)
    try:
        from cem.s2connect.service import S2ConnectAuthorizer, WebsocketTokens

        ws_tokens = WebsocketTokens()
        websocket_port = await server.listen(s2c.host, s2c.websocket_port, ssl_context=context,
                                             authorizer=S2ConnectAuthorizer(ws_tokens))
    except BaseException:
        api_socket.close()
        raise
    api_port = int(api_socket.getsockname()[1])
    host = _bracket(url_host(config))
    urls = Urls(pairing=f"https://{host}:{api_port}{BASE}", session=f"https://{host}:{api_port}{BASE}",
                websocket=f"wss://{host}:{websocket_port}/")
    endpoint = EndpointDescription(name=s2c.endpoint_name, deployment=s2c.deployment)
    service = S2ConnectService(book, node_description(node_id, config.site.name), endpoint, urls,
                               fingerprint=tls.leaf_fingerprint if s2c.deployment == "LAN" else None,
                               domain=s2c.domain or url_host(config), ws_tokens=ws_tokens)
    service.attach(server)
    uv = _Uvicorn(uvicorn.Config(build_app(lambda: holder[0] if holder else None),
                                 ssl_certfile=str(tls.chain), ssl_keyfile=str(tls.leaf_key),
                                 log_level="warning", access_log=False, lifespan="off",
                                 server_header=False, timeout_keep_alive=20))
    task = asyncio.get_running_loop().create_task(uv.serve(sockets=[api_socket]),
                                                  name="s2connect-https")
    while not uv.started:
        if task.done():
            api_socket.close()
            raise OSError(f"the S2 Connect API did not start: {task.exception()!r}")
        await asyncio.sleep(0.02)
    holder.append(service)
    await service.start()
    await book.set_pairing_url(urls.pairing)
    announcer = None
    if s2c.discovery if s2c.discovery is not None else discovery_default(s2c.host):
        announcer = Announcer(instance=url_host(config).removesuffix(".local"), port=api_port,
                              txt=txt_record(pairing_url=urls.pairing,
                                             endpoint_name=s2c.endpoint_name,
                                             longpolling_url=urls.pairing
                                             if s2c.deployment == "LAN" else None))
        try:
            await announcer.start()
        except Exception as exc:
            logger.warning("S2 Connect: DNS-SD announcement failed (%s); pairing by URL still "
                           "works", exc)
            announcer = None
    logger.info("S2 Connect: pairing URL %s (node %s, %s), websocket %s", urls.pairing, node_id,
                s2c.deployment, urls.websocket)
    return S2ConnectEdge(service, tls, api_port, websocket_port, uv, task, announcer)


def plain_mode_closed() -> PlainModeClosed:
    return PlainModeClosed()
