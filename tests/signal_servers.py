"""Servers on loopback that stand in for internet feeds the tests cannot reach.

Each is a small Starlette app under a real uvicorn server, answering in the provider's wire
format from recorded fixtures (`tests/fixtures/signals/`), so the real client code (entsoe-py,
energyzero, the CEM's OpenADR VEN) runs unchanged. `mode` can be changed mid-test: "ok",
"error" (HTTP 503), "timeout" (answers after `delay_s`), "down" (every request gets 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FIXTURES = Path(__file__).parent / "fixtures" / "signals"
TOKEN = "loopback-test-token"


@contextlib.asynccontextmanager
async def serve(app: Any, *, cert: Path | None = None,
                key: Path | None = None) -> AsyncIterator[tuple[str, int]]:
    """Run `app` on 127.0.0.1 (a free port); yields (base URL, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            ssl_certfile=str(cert) if cert else None,
                            ssl_keyfile=str(key) if key else None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"{'https' if cert else 'http'}://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
        sock.close()


def certificate_for(tmp_path: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for `host` (and 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / f"{host}.crt", tmp_path / f"{host}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", f"/CN={host}", "-addext",
                    f"subjectAltName=DNS:{host},IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


class FeedServer:
    """What every stand-in shares: a mode, a delay, and the requests it saw."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 3.0
        self.requests: list[dict[str, Any]] = []

    async def misbehave(self) -> Response | None:
        if self.mode == "timeout":
            await asyncio.sleep(self.delay_s)
        if self.mode in ("error", "down"):
            return Response("Service Unavailable", status_code=503, media_type="text/plain")
        return None


def _interval(text: str) -> tuple[datetime, datetime]:
    start = re.search(r"<period\.timeInterval>\s*<start>([^<]+)</start>\s*<end>([^<]+)</end>",
                      text)
    assert start, "fixture without period.timeInterval"
    return (datetime.fromisoformat(start.group(1).replace("Z", "+00:00")),
            datetime.fromisoformat(start.group(2).replace("Z", "+00:00")))


class EntsoeServer(FeedServer):
    """ENTSO-E Transparency's `/api` for A44 day-ahead prices."""

    def __init__(self, documents: list[str]) -> None:
        super().__init__()
        self.documents = [(FIXTURES / name).read_text() for name in documents]
        self.scale = 1.0  # a correction: every price times this
        self.app = Starlette(routes=[Route("/api", self.api)])

    async def api(self, request: Request) -> Response:
        q = dict(request.query_params)
        self.requests.append(q)
        if q.get("securityToken") != TOKEN:
            return Response((FIXTURES / "entsoe_401_unauthorized.html").read_text(),
                            status_code=401, media_type="text/html")
        wrong = await self.misbehave()
        if wrong is not None:
            return wrong
        assert q["documentType"] == "A44" and q["in_Domain"] == "10YNL----------L"
        start = datetime.strptime(q["periodStart"], "%Y%m%d%H%M").replace(tzinfo=UTC)
        end = datetime.strptime(q["periodEnd"], "%Y%m%d%H%M").replace(tzinfo=UTC)
        matching = [d for d in self.documents if _interval(d)[0] < end and _interval(d)[1] > start]
        if int(q.get("offset", 0)) > 0 or not matching:
            return Response((FIXTURES / "entsoe_ack_no_matching_data.xml").read_text(),
                            media_type="application/xml")
        body = matching[0]
        if self.scale != 1.0:
            body = re.sub(r"<price\.amount>([-\d.]+)</price\.amount>",
                          lambda m: f"<price.amount>{float(m.group(1)) * self.scale:.2f}"
                                    "</price.amount>", body)
        return Response(body, media_type="application/xml")


class EnergyZeroServer(FeedServer):
    """EnergyZero's `/v1/gql` (the energyzero client's GraphQL query for electricity)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = json.loads((FIXTURES / "energyzero_gql_2026-03-10.json").read_text())
        self.app = Starlette(routes=[Route("/v1/gql", self.gql, methods=["POST"])])

    async def gql(self, request: Request) -> Response:
        query = await request.json()
        self.requests.append(query)
        wrong = await self.misbehave()
        if wrong is not None:
            return wrong
        window = query["variables"]["input"]
        start = datetime.fromisoformat(window["from"].replace("Z", "+00:00"))
        till = datetime.fromisoformat(window["till"].replace("Z", "+00:00"))
        prices = [p for p in self.body["data"]["energyMarketPrices"]["prices"]
                  if start <= datetime.fromisoformat(p["from"].replace("Z", "+00:00")) < till]
        data = json.loads(json.dumps(self.body))
        data["data"]["energyMarketPrices"]["prices"] = prices
        return JSONResponse(data)


class LoopbackResolver:
    """An aiohttp resolver that sends every name to 127.0.0.1:`port` (the test server)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0,
                      family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": self.port,
                 "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


class Vtn(FeedServer):
    """An OpenADR 3 VTN: `/auth/server`, a token endpoint, `/programs`, `/vens`, `/events`.

    `events` is the list served (change it mid-test); `version` picks 3.1.0 string targets or
    3.0.1 `{type, values}` targets in `event()`.
    """

    CLIENT_ID, CLIENT_SECRET, ACCESS = "cem-site-1", "s3cret-client", "vtn-access-token"

    def __init__(self, version: str = "3.1.0") -> None:
        super().__init__()
        self.version = version
        self.events: list[dict[str, Any]] = []
        self.vens: list[dict[str, Any]] = []
        self.tokens_issued = 0
        self.app = Starlette(routes=[
            Route("/auth/server", self.auth_server),
            Route("/token", self.token, methods=["POST"]),
            Route("/programs", self.programs),
            Route("/vens", self.ven_list, methods=["GET", "POST"]),
            Route("/events", self.event_list)])

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") in (f"Bearer {self.ACCESS}",
                                                        f"Bearer {TOKEN}")

    async def auth_server(self, request: Request) -> Response:
        return JSONResponse({"tokenURL": str(request.url_for("token"))})

    async def token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != (
                "client_credentials", self.CLIENT_ID, self.CLIENT_SECRET):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        self.tokens_issued += 1
        return JSONResponse({"access_token": self.ACCESS, "token_type": "Bearer",
                             "expires_in": 3600})

    async def programs(self, request: Request) -> Response:
        wrong = await self.misbehave()
        if wrong is not None:
            return wrong
        if not self._authorized(request):
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        return JSONResponse([{"id": "prog-gac", "programName": "gac-congestion-nl",
                              "createdDateTime": "2026-01-01T00:00:00Z",
                              "modificationDateTime": "2026-01-01T00:00:00Z",
                              "objectType": "PROGRAM",
                              "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                                      "payloadType": "IMPORT_CAPACITY_LIMIT",
                                                      "units": "KW"}]}])

    async def ven_list(self, request: Request) -> Response:
        wrong = await self.misbehave()
        if wrong is not None:
            return wrong
        if not self._authorized(request):
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        if request.method == "POST":
            body = await request.json()
            ven = {"id": f"ven-{len(self.vens) + 1}", "venName": body["venName"],
                   "clientID": self.CLIENT_ID, "createdDateTime": "2026-01-01T00:00:00Z",
                   "modificationDateTime": "2026-01-01T00:00:00Z"}
            self.vens.append(ven)
            return JSONResponse(ven, status_code=201)
        name = request.query_params.get("venName")
        return JSONResponse([v for v in self.vens if name is None or v["venName"] == name])

    async def event_list(self, request: Request) -> Response:
        self.requests.append(dict(request.query_params))
        wrong = await self.misbehave()
        if wrong is not None:
            return wrong
        if not self._authorized(request):
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        program = request.query_params.get("programID")
        return JSONResponse([e for e in self.events if program in (None, e["programID"])])

    def event(self, event_id: str, start: datetime, limits_kw: list[float], *,
              duration: str = "PT15M", kind: str = "IMPORT_CAPACITY_LIMIT",
              name: str = "congestion", ean: str = "871685900000000018",
              **changes: Any) -> dict[str, Any]:
        """A GAC event: continuous intervals of `duration` from `start`, one limit each."""
        targets: list[Any] = [ean] if self.version == "3.1.0" else [
            {"type": "POWER_SERVICE_LOCATION", "values": [ean]}]
        event = {
            "id": event_id, "programID": "prog-gac", "eventName": name, "objectType": "EVENT",
            "createdDateTime": "2026-01-01T00:00:00Z",
            "modificationDateTime": "2026-01-01T00:00:00Z", "targets": targets,
            "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                    "payloadType": kind, "units": "KW"}],
            "intervalPeriod": {"start": start.isoformat().replace("+00:00", "Z"),
                               "duration": duration},
            "intervals": [{"id": i, "payloads": [{"type": kind, "values": [v]}]}
                          for i, v in enumerate(limits_kw)]}
        event.update(changes)
        return event
