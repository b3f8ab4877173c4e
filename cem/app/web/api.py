"""The HTTP API and the page: a FastAPI app over a `SiteView`.

Reads (`GET /api/...`, the page, `/metrics`, `/healthz`) are open to clients on loopback and
need a bearer token from `[http] tokens` from anywhere else; writes (`POST`) always need one.
Every error is JSON `{"error": "...", ...}` with a 4xx status that says what is wrong: a bad
body, an unknown EV charger, a window that ends before it starts. The OpenAPI description is
at `/openapi.json` and `/docs` shows it with Swagger UI served from the installed
`swagger-ui-bundle` package (no CDN: sites are often offline).
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cem.app.web.metrics import CONTENT_TYPE, metrics_registry, render
from cem.app.web.view import SiteView, iso
from cem.control.ev_modes import MODES, EvModeError, check_mode
from sitekit import clock

logger = logging.getLogger("cem.web")

STATIC = resources.files("cem.app.web") / "static"
T = TypeVar("T")


class ApiError(Exception):
    """A request the API refuses; becomes `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class CongestionChange(BaseModel):
    """Add a congestion window (`action` add, with start, end and a limit) or remove one
    (`action` remove, with its `id`)."""

    action: Literal["add", "remove"] = "add"
    start: datetime | None = Field(None, description="ISO 8601 with offset")
    end: datetime | None = Field(None, description="ISO 8601 with offset")
    import_limit_kw: float | None = Field(None, ge=0)
    export_limit_kw: float | None = Field(None, ge=0)
    id: int | None = Field(None, description="the window to remove")

    @field_validator("import_limit_kw", "export_limit_kw")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of kW")
        return value


class ModeChange(BaseModel):
    """An EV charger's charging mode: smart (optionally a minimum first), charge now, paused."""

    mode: Literal["smart", "charge_now", "paused"]
    min_kwh: float | None = Field(None, description="with smart: charge this much first")


def _client_is_local(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def _token_name(request: Request, tokens: list[tuple[str, str]]) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    for name, token in tokens:
        if hmac.compare_digest(given.strip().encode(), token.encode()):
            return name
    return None


def create_app(view: SiteView) -> FastAPI:
    """The app serving the page, the API, `/metrics` and `/healthz` for `view`."""
    config = view.config
    tokens = [(t.name, t.token) for t in config.http.tokens]
    registry = metrics_registry(view)
    app = FastAPI(title=f"S2 CEM: {config.site.name}", version="1",
                  description="Live state of the site, its plan and its devices; congestion "
                              "windows and EV charging modes. Reads are open on loopback; "
                              "writes need `Authorization: Bearer <token>` from [http] tokens.",
                  docs_url=None, redoc_url=None)

    def can_read(request: Request) -> None:
        if _client_is_local(request) or _token_name(request, tokens) is not None:
            return
        raise ApiError(401, "reads from other hosts than this one need a bearer token from "
                            "[http] tokens (Authorization: Bearer <token>)")

    def can_write(request: Request) -> str:
        if not tokens:
            raise ApiError(403, "writes are off: no [[http.tokens]] in the site config; add "
                                "one (name, token) and send it as Authorization: Bearer <token>")
        name = _token_name(request, tokens)
        if name is None:
            raise ApiError(401, "this needs a bearer token from [http] tokens "
                                "(Authorization: Bearer <token>)")
        return name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(problems), "problems": problems},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        text = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            text = f"no such page or API: {request.url.path} (the API is described at /docs)"
        return JSONResponse({"error": text}, status_code=exc.status_code)

    # --- the page, docs, health and metrics -------------------------------------------------

    @app.get("/", include_in_schema=False, dependencies=[Depends(can_read)])
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    swagger = _swagger_dir()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger is None:
            return HTMLResponse("<p>Swagger UI is not installed (pip install swagger-ui-bundle)"
                                "; the API description is at <a href='/openapi.json'>"
                                "/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title + " API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/healthz", summary="200 when the control loop runs and its plan is fresh, "
                                 "503 with the reason otherwise")
    async def healthz() -> JSONResponse:
        ok, reason = view.health(clock.now())
        return JSONResponse({"ok": ok, "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(can_read)])
    async def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    # --- reads ------------------------------------------------------------------------------

    @app.get("/api/state", dependencies=[Depends(can_read)],
             summary="Everything the page shows: power, limits, plan summary, RMs, EVs, "
                     "congestion, decisions, health; with the power history")
    async def state() -> Response:
        text = await view.snapshot_text_async()
        history = json.dumps(view.history_json(), separators=(",", ":"))
        return Response('{"history":' + history + "," + text[1:],
                        media_type="application/json")

    @app.get("/api/plan", dependencies=[Depends(can_read)],
             summary="The plan in force over the horizon, per device, with limits and prices")
    async def plan() -> Response:
        text = view.plan_text()
        if text is None:
            raise ApiError(404, "no plan yet: the control loop has not planned (no RMs, or "
                                "it is starting)")
        return Response(text, media_type="application/json")

    @app.get("/api/rms", dependencies=[Depends(can_read)],
             summary="Every RM: kind, control type, connection, last message, instruction in "
                     "force")
    async def rms() -> JSONResponse:
        await view.known_rms()
        return JSONResponse(await _off_loop(view.rm_rows, clock.now()))

    @app.get("/api/evs", dependencies=[Depends(can_read)],
             summary="Every EV: driver, energy, target, departure and its source, the plan, "
                     "its mode and why it gets what it gets now")
    async def evs() -> JSONResponse:
        return JSONResponse(await _off_loop(view.ev_rows, clock.now()))

    @app.get("/api/prices", dependencies=[Depends(can_read)],
             summary="Import and export prices per PTU of the horizon (EUR/kWh)")
    async def prices() -> JSONResponse:
        problem = getattr(view.controller, "problem", None)
        if problem is None:
            raise ApiError(404, "no prices yet: the control loop has not planned")
        return JSONResponse([
            {"start": iso(problem.ptu_start(t)),
             "import_eur_per_kwh": round(float(problem.prices.import_eur_per_kwh[t]), 5),
             "export_eur_per_kwh": round(float(problem.prices.export_eur_per_kwh[t]), 5)}
            for t in range(problem.n_ptus)])

    @app.get("/api/congestion", dependencies=[Depends(can_read)],
             summary="Congestion windows that have not ended, with their source")
    async def congestion() -> JSONResponse:
        return JSONResponse(await _windows(view))

    @app.get("/api/sessions", dependencies=[Depends(can_read)],
             summary="Open charging sessions (the OCPP central system's database)")
    async def sessions(format: Literal["json", "csv"] = "json") -> Response:
        return _sessions_response(await _read_sessions(view, "open"), format, "sessions")

    @app.get("/api/cdrs", dependencies=[Depends(can_read)],
             summary="Charge detail records (closed sessions), JSON or CSV (?format=csv)")
    async def cdrs(format: Literal["json", "csv"] = "json") -> Response:
        return _sessions_response(await _read_sessions(view, "closed"), format, "cdrs")

    @app.get("/api/events", dependencies=[Depends(can_read)],
             summary="Server-sent events: `state` every push interval, `plan` when it changes")
    async def events(request: Request) -> EventSourceResponse:
        return EventSourceResponse(_stream(view, request), ping=15)

    # --- writes -----------------------------------------------------------------------------

    @app.post("/api/congestion", status_code=201,
              summary="Add or remove a congestion window (as `cem congestion add`, source "
                      "'api'); the control loop replans at once")
    async def change_congestion(change: CongestionChange,
                                who: str = Depends(can_write)) -> JSONResponse:
        store = view.store
        if store is None:
            raise ApiError(409, "this CEM has no store to keep congestion windows in")
        if change.action == "remove":
            if change.id is None:
                raise ApiError(422, "id: give the id of the window to remove (GET "
                                    "/api/congestion lists them)")
            if not await store.remove_congestion(change.id):
                raise ApiError(404, f"no congestion window with id {change.id}",
                               windows=await _windows(view))
            view.note(f"congestion window {change.id} removed by {who}")
            await _refresh(view)
            return JSONResponse({"removed": change.id}, status_code=200)
        if change.start is None or change.end is None:
            raise ApiError(422, "start and end are needed, ISO 8601 with offset, e.g. "
                                "2026-11-23T17:00:00+01:00")
        for name, moment in (("start", change.start), ("end", change.end)):
            if moment.tzinfo is None:
                raise ApiError(422, f"{name}: {moment.isoformat()} has no UTC offset; add "
                                    "one, e.g. +01:00 or Z")
        if change.end <= change.start:
            raise ApiError(422, "end must be later than start")
        if change.import_limit_kw is None and change.export_limit_kw is None:
            raise ApiError(422, "give import_limit_kw, export_limit_kw or both")
        window_id = await store.add_congestion(
            change.start.astimezone(UTC), change.end.astimezone(UTC), change.import_limit_kw,
            change.export_limit_kw, source="api")
        limit = (f"import {change.import_limit_kw:g} kW" if change.import_limit_kw is not None
                 else f"export {change.export_limit_kw:g} kW")
        view.note(f"congestion window {window_id} added by {who}",
                  f"{change.start.isoformat()} to {change.end.isoformat()}, {limit}")
        await _refresh(view)
        return JSONResponse({"id": window_id, "start": iso(change.start),
                             "end": iso(change.end), "import_limit_kw": change.import_limit_kw,
                             "export_limit_kw": change.export_limit_kw, "source": "api"},
                            status_code=201)

    @app.post("/api/evs/{evse:path}/mode",
              summary="Set an EV charger's mode: smart (optionally min_kwh first), charge_now "
                      "or paused; applied on the next replan, kept until the EV leaves")
    async def set_mode(evse: str, change: ModeChange,
                       who: str = Depends(can_write)) -> JSONResponse:
        controller = view.controller
        if controller is None:
            raise ApiError(409, "no control loop is running to apply a mode")
        rm_id = _find_evse(view, evse)
        try:
            check_mode(change.mode, change.min_kwh)
            entry = await view.modes.set(rm_id, change.mode, change.min_kwh, clock.now(),
                                         source=f"api ({who})")
        except EvModeError as exc:
            raise ApiError(422, str(exc)) from None
        name = view._name(rm_id)
        view.note(f"{name}: {entry.describe()}", f"set by {who}")
        controller.request_replan(f"the operator set {name} to {entry.describe()}")
        return JSONResponse({"rm_id": rm_id, "evse": name, "mode": entry.mode,
                             "min_kwh": entry.min_kwh, "set_at": iso(entry.set_at),
                             "applied": "on the next replan (requested now)"})

    return app


async def _off_loop(work: Callable[..., T], *args: Any) -> T:
    """Rows of 1000 RMs are ~25 ms of Python: built in a thread, redone on the loop should
    the parts change under it."""
    try:
        return await asyncio.to_thread(work, *args)
    except RuntimeError:
        return work(*args)


def _swagger_dir() -> Path | None:
    try:
        import swagger_ui_bundle  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


def _find_evse(view: SiteView, evse: str) -> str:
    """The RM id of an EV charger named by its RM id, its RM name or its EVSE name."""
    live = view.server.rms() if view.server is not None else {}
    problem = getattr(view.controller, "problem", None)
    mapping = getattr(view.controller, "mapping", None)
    ev_rms = set()
    if problem is not None and mapping is not None:
        kinds = {s.id: s.kind for s in problem.storage}
        ev_rms = {rm for rm, assets in mapping.rm_assets.items()
                  if any(kinds.get(a) == "ev" for a in assets)}
    wanted = evse.strip()
    matches = [rm for rm, entry in live.items()
               if wanted in (rm, entry.name or "") or (entry.name or "").endswith(" " + wanted)]
    if not matches:
        known = sorted((live[rm].name or rm) for rm in ev_rms if rm in live)
        raise ApiError(404, f"no connected EV charger {evse!r}", known=known)
    rm_id = matches[0]
    if rm_id not in ev_rms:
        raise ApiError(409, f"{evse!r} is not an EV charger the CEM plans (no EV storage in "
                            "its flexibility)")
    return rm_id


async def _refresh(view: SiteView) -> None:
    """Have the store's congestion source read the change now (not at its next poll) and
    publish it to the control loop, which replans with its reason."""
    from cem.signals.congestion import StoreCongestion

    controller = view.controller
    for source in list(getattr(controller, "signals", ())):
        if isinstance(source, StoreCongestion):
            try:
                update = await source.refresh()
            except Exception:
                logger.exception("reading the congestion windows after an API change failed")
                continue
            if update is not None:
                controller.publish(update)


async def _windows(view: SiteView) -> list[dict[str, Any]]:
    """The windows that have not ended: every source's as the control loop has them; the
    config's and the store's without a control loop. `id` is the store's window id."""
    now = clock.now()
    limits = list(getattr(view.controller, "congestion", None) or [])
    if view.controller is None:
        limits = [SimpleNamespace(start=w.start, end=w.end, import_limit_kw=w.import_limit_kw,
                                  export_limit_kw=w.export_limit_kw, source="config", ref=None)
                  for w in view.config.congestion]
        if view.store is not None:
            limits += [SimpleNamespace(start=r.start, end=r.end, import_limit_kw=r.import_limit_kw,
                                       export_limit_kw=r.export_limit_kw, source=r.source,
                                       ref=str(r.window_id))
                       for r in await view.store.list_congestion(ending_after=now)]
    out = []
    for w in limits:
        if w.end <= now:
            continue
        ref = getattr(w, "ref", None)
        stored = ref is not None and str(ref).isdigit() and w.source not in ("config", "openadr")
        out.append({"id": int(str(ref)) if stored else None, "ref": ref, "start": iso(w.start),
                    "end": iso(w.end), "import_limit_kw": w.import_limit_kw,
                    "export_limit_kw": w.export_limit_kw, "source": w.source,
                    "active": w.start <= now < w.end})
    out.sort(key=lambda w: (w["start"] or "", w["id"] or 0))
    return out


SESSION_COLUMNS = ("cp_id", "evse_id", "transaction_id", "id_tag", "card_name", "started_at",
                   "stopped_at", "energy_kwh", "power_kw", "soc", "cost_eur", "peak_kw",
                   "limit_a", "stop_reason", "state")


async def _read_sessions(view: SiteView, state: str) -> list[dict[str, Any]]:
    from resource_managers.ocpp_charger.records import read_sessions

    ocpp = getattr(view.config, "ocpp", None)  # the site file's [ocpp] (cem.app.site_file)
    if ocpp is None:
        raise ApiError(404, "this CEM has no [ocpp] section: no charging sessions to show")
    path = Path(ocpp.database)
    if not await asyncio.to_thread(path.exists):
        raise ApiError(404, f"no OCPP database at {path}: the OCPP central system of this "
                            "site keeps sessions there (is it running on another host?)")
    rows = await asyncio.to_thread(read_sessions, path, state)
    return [{"cp_id": r.cp_id, "evse_id": r.evse_id, "transaction_id": r.transaction_id,
             "id_tag": r.id_tag, "card_name": r.card_name, "started_at": iso(r.started_at),
             "stopped_at": iso(r.stopped_at), "energy_kwh": round(r.energy_wh / 1000, 3),
             "power_kw": round(r.power_w / 1000, 2), "soc": r.soc,
             "cost_eur": round(r.cost_eur, 2), "peak_kw": round(r.peak_w / 1000, 2),
             "limit_a": r.limit_a, "stop_reason": r.stop_reason, "state": r.state}
            for r in rows]


def _sessions_response(rows: list[dict[str, Any]], format: str, name: str) -> Response:
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=SESSION_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return PlainTextResponse(out.getvalue(), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="{name}.csv"'})
    return JSONResponse(rows)


async def _stream(view: SiteView, request: Request) -> AsyncIterator[dict[str, str]]:
    """`state` on every sample, `plan` whenever the plan changes; ends with the CEM."""
    view.listeners += 1
    sent_plan: Any = None
    try:
        while not view.stopping:
            yield {"event": "state", "data": await view.snapshot_text_async()}
            key = view.plan_key()
            if key is not None and key != sent_plan:
                sent_plan = key
                text = view.plan_text()
                if text is not None:
                    yield {"event": "plan", "data": text}
            while not await view.wait_tick(30.0):
                if view.stopping or await request.is_disconnected():
                    return
    finally:
        view.listeners -= 1


__all__ = ["MODES", "ApiError", "create_app"]
