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
