"""The OCPP central system (CSMS): chargers in, EVSE state and charging limits out.

One websocket port serves OCPP 1.6J and 2.0.1 (picked by subprotocol); the charge point id is
the last part of the URL path. Each connected charger gets a handler of its version; both keep
the same per-EVSE state (`Evse`, with the running `EvSession`), write sessions/CDRs to SQLite
(`records.py`) and tell listeners (the S2 side) when something changed. Listeners are plain
callbacks that must not block: they are called from inside OCPP handlers, where awaiting a call
to the same charger would deadlock.

Safety first: every charger gets a TxDefaultProfile at the site's safe limit on boot, so it
stays within the fuse if the CSMS or the CEM is gone.

Nothing a charger sends can corrupt the site: a message naming an EVSE beyond the charge
point's configured ones gets a CALLERROR (PropertyConstraintViolation) and creates nothing; an
EVSE has at most one open session (a new transaction closes the one left open, with the reason
in its CDR); implausible meter values are dropped before they reach a session, a CDR or the
CEM (`plausibility`); frames that are no OCPP message get a CALLERROR or are dropped
(`frames`), never a closed connection. `set_current` sends a TxProfile for the
running transaction and reports whether the charger accepted it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, time, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

from ocpp.charge_point import ChargePoint as OcppChargePoint
from ocpp.exceptions import NotImplementedError as OcppNotImplementedError
from ocpp.exceptions import NotSupportedError, OCPPError, PropertyConstraintViolationError
from ocpp.messages import Call, CallError, unpack
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from resource_managers.ocpp_charger import frames, limits
from resource_managers.ocpp_charger.config import CdrTariff, ChargeCard, ChargePoint, OcppRmConfig
from resource_managers.ocpp_charger.evse import Evse, EvSession, LimitResult
from resource_managers.ocpp_charger.plausibility import (
    judge_reading,
    needs_problem,
    register_problem,
    report,
)
from resource_managers.ocpp_charger.records import SessionRecords
from sitekit import clock
from sitekit.admission import Admission
from sitekit.lock import InstanceLock
from sitekit.net import bind_tcp
from sitekit.prices import CsvPriceSource, retail_import_eur_per_kwh

logger = logging.getLogger("resource_managers.ocpp")

SUBPROTOCOLS = (Subprotocol("ocpp1.6"), Subprotocol("ocpp2.0.1"))
PLUGGED_16 = {"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing"}
IN_TRANSACTION_16 = {"Charging", "SuspendedEV", "SuspendedEVSE"}
ENERGY = "Energy.Active.Import.Register"
#: an EV taken as full is offered to the CEM again after this long, if it may only have paused
RETRY_FULL_AFTER = timedelta(minutes=30)
FULL_SOC_PCT = 99.0  # an EV that says this SoC is full: never offered again
NEED_MET_MARGIN_WH = 100.0  # within this of its need, an EV that stopped is done


def _now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


def _parse_time(value: str | None) -> datetime:
    if not value:
        return _now()
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _now()
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


EvseListener = Callable[[Evse], None]
MAX_EVSES_UNKNOWN = 8  # EVSEs an accepted unknown charge point may name (as a configured one)


class _Tariff:
    """All-in import price per kWh for CDR costs: day-ahead CSV with the RM's tariff, or flat."""

    def __init__(self, tariff: CdrTariff) -> None:
        self._tariff = tariff
        self._source: CsvPriceSource | None = None
        if tariff.csv is not None:
            try:
                self._source = CsvPriceSource(tariff.csv)
            except Exception as exc:  # a price file problem must not stop charging
                logger.warning("CDR costs use the flat price: cannot read %s (%s)",
                               tariff.csv, exc)

    def eur_per_kwh(self, at: datetime) -> float:
        t = self._tariff
        if self._source is not None:
            try:
                found = self._source.day_ahead_eur_per_mwh(at, at + timedelta(seconds=1))
            except Exception:
                found = []
            if found:
                return float(retail_import_eur_per_kwh(
                    found[-1][1], markup_eur_per_kwh=t.markup_eur_per_kwh,
                    tax_eur_per_kwh=t.tax_eur_per_kwh, vat=t.vat))
        return t.flat_import_eur_per_kwh


def next_local_time(after_moment: datetime, at: time, timezone: str) -> datetime:
    """The first moment after `after_moment` with local clock time `at`."""
    zone = ZoneInfo(timezone)
    local = after_moment.astimezone(zone)
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate.astimezone(UTC)


class OcppCentralSystem:
    """OCPP 1.6J + 2.0.1 central system; with `cem_url`, every EVSE is an S2 RM of that CEM.

    `await start()` binds the port (`port` gives the bound one, also for port 0), `await stop()`
    closes chargers, S2 sessions and the database.
    """

    def __init__(self, config: OcppRmConfig, cem_url: str | None = None, *,
                 token: str | None = None, host: str | None = None, port: int | None = None,
                 database: Path | None = None, response_timeout_s: float = 10.0) -> None:
        self.config = config
        self.cem_url = cem_url
        self.token = token
        self.host = host or config.ocpp.host
        self.requested_port = config.ocpp.port if port is None else port
        self.records = SessionRecords(database or config.ocpp.database)
        self.response_timeout_s = response_timeout_s
        self.evses: dict[tuple[str, int], Evse] = {}
        self.boot_info: dict[str, tuple[str | None, str | None]] = {}  # cp id -> vendor, model
        self.links: dict[str, OcppChargePoint] = {}
        self.cards = {card.id_tag: card for card in config.charge_cards}
        self.charge_points = {cp.id: cp for cp in config.ocpp.charge_points}
        self.tariff = _Tariff(config.tariff)
        self._listeners: list[EvseListener] = []
        self._server: Server | None = None
        self.scheme = "ws"  # "wss" once started with a certificate (security profile 2)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_tx = 1
        self.admission = Admission(
            "OCPP central system", logger, max_connections=config.ocpp.max_connections,
            max_failed_auth_per_minute=config.ocpp.max_failed_auth_per_minute)
        self.s2: Any = None  # resource_managers.ocpp_charger.s2_evse.EvseResources when cem_url
        self.lock_command = "the OCPP central system"  # who holds the database, for a 2nd one
        self._lock: InstanceLock | None = None
        self._socket: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.sockets[0].getsockname()[1])
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self.requested_port

    async def bind(self) -> None:
        """Take the database's lock and bind the OCPP port; nothing is opened or written yet.

        Raises `sitekit.lock.LockHeld` (another central system uses this database: it is left
        alone), ssl.SSLError / OSError (unusable TLS files, the port is taken). Idempotent.
        """
        if self._lock is None:
            self._lock = InstanceLock(self.records.path, command=self.lock_command).acquire()
        try:
            self._tls = self.config.ocpp.tls_context()  # security profile 2: TLS + Basic auth
            if self._socket is None:
                self._socket = bind_tcp(self.host, self.requested_port)
        except OSError:  # ssl.SSLError too
            self._unbind()
            raise

    def _unbind(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def start(self) -> None:
        """Lock and bind (unless `bind()` did), recover the database, serve the chargers."""
        await self.bind()
        try:
            await self.records.open()
            await self._recover()
        except BaseException:
            await self.records.close()
            self._unbind()
            raise
        for cp in self.config.ocpp.charge_points:
            for evse_id in range(1, cp.evses + 1):
                self._evse(cp.id, evse_id)
        self._check_safe_limit()
        tls, sock = self._tls, self._socket
        self._socket = None
        try:
            self._server = await serve(
                self._connection, sock=sock,
                subprotocols=list(SUBPROTOCOLS),
                select_subprotocol=self._select_subprotocol,
                process_request=self._check_request,
                ping_interval=30, ping_timeout=30, ssl=tls,
                max_size=frames.WEBSOCKET_MAX_BYTES,  # larger frames get a CALLERROR (frames)
            )
        except OSError:  # ssl.SSLError too
            if sock is not None:
                sock.close()
            await self.records.close()
            self._unbind()
            raise
        self.scheme = "wss" if tls is not None else "ws"
        if self.cem_url is not None:
            from resource_managers.ocpp_charger.s2_evse import EvseResources

            self.s2 = EvseResources(self, self.cem_url, token=self.token)
            self.s2.start()
        logger.info("OCPP central system listening on %s://%s:%d (OCPP 1.6J and 2.0.1), "
                    "%d charge point(s) configured, unknown charge points %s, unknown cards %s",
                    self.scheme, self.host, self.port, len(self.charge_points),
                    "accepted" if self.config.ocpp.accept_unknown_charge_points else "refused",
                    self.config.ocpp.unknown_cards + "ed")

    async def _recover(self) -> None:
        """After a crash (or a stop): close the sessions left open, each from its last meter
        value and with a reason that says so; the charger's next message about it (meter
        values, a StatusNotification that it still charges, a TransactionEvent, its stop)
        resumes or corrects that same row, so a CDR is neither lost nor counted twice."""
        for row in await self.records.close_orphans():
            logger.warning("session %s on %s/%s (card %s) was open when the CSMS stopped: closed "
                           "it from its last meter value (%.2f kWh); the charger's own stop "
                           "message will correct it", row.transaction_id, row.cp_id, row.evse_id,
                           row.id_tag or "none", row.energy_wh / 1000)
        async with self.records.db.execute(
                "SELECT MAX(CAST(transaction_id AS INTEGER)) FROM sessions") as cursor:
            highest = await cursor.fetchone()
        self._next_tx = int(highest[0] or 0) + 1 if highest else 1

    async def resume_if_charging(self, evse: Evse) -> None:
        """A charger says an EVSE is in a transaction (OCPP 1.6 Charging / Suspended*) while
        we know none there: after our restart, resume the last session of that EVSE that was
        closed only because of the restart (its meter values then continue on the same row)."""
        if evse.session is not None:
            return
        row = await self.records.last_resumable(evse.cp_id, evse.evse_id)
        if row is not None:
            await self.begin_session(evse, row.transaction_id, row.id_tag, row.started_at,
                                     row.meter_start_wh)

    def _check_safe_limit(self) -> None:
        """Warn when the default profiles together could exceed the fuse (CEM gone, all busy)."""
        fuse = self.config.fuse_a
        if fuse is None:
            return
        worst = 0.0
        for cp in self.config.ocpp.charge_points:
            worst += cp.evses * min(self.config.ocpp.safe_limit_a, cp.max_current_a)
        if worst > fuse:
            logger.warning("the safe limit of %.1f A per EVSE adds up to %.1f A on a phase when "
                           "every configured EVSE charges without the CEM, more than the %.0f A "
                           "fuse; lower ocpp.safe_limit_a (0 pauses EVs until the CEM decides)",
                           self.config.ocpp.safe_limit_a, worst, fuse)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self.s2 is not None:
            await self.s2.stop()
            self.s2 = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.records.close()
        self._unbind()
        logger.info("OCPP central system stopped")

    def add_listener(self, listener: EvseListener) -> None:
        self._listeners.append(listener)

    def _changed(self, evse: Evse) -> None:
        evse.changed_at = _now()
        for listener in self._listeners:
            try:
                listener(evse)
            except Exception:
                logger.exception("EVSE listener failed for %s", evse.name)

    def spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        """Run work that must not block an OCPP handler (e.g. a call back to the charger)."""
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("%s failed: %r", what, t.exception())

        task.add_done_callback(done)
        return task

    # --- websocket handshake ---------------------------------------------------------------

    @staticmethod
    def charge_point_id(path: str) -> str:
        return unquote(path.split("?")[0].rstrip("/").rsplit("/", 1)[-1])

    def _select_subprotocol(self, connection: ServerConnection,
                            offered: Sequence[Subprotocol]) -> Subprotocol | None:
        cp_id = self.charge_point_id(connection.request.path) if connection.request else "?"
        for protocol in SUBPROTOCOLS:
            if protocol in offered:
                return protocol
        if not offered:
            logger.warning("charger '%s' refused: it offers no OCPP subprotocol (we speak %s)",
                           cp_id, " and ".join(SUBPROTOCOLS))
        else:
            logger.warning("charger '%s' refused: it offers %s, we speak %s",
                           cp_id, ", ".join(offered), " and ".join(SUBPROTOCOLS))
        raise NegotiationError("unsupported OCPP version; use ocpp1.6 or ocpp2.0.1")

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse unknown charge points (per config) and wrong passwords (security profile 1);
        before that, too many connections or too many failed logins from one address
        (`sitekit.admission`). Each refusal is counted; the first of its kind a minute (per
        charge point id) is logged, the rest in one summary line a minute."""
        cp_id = self.charge_point_id(request.path)
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        self.admission.flush()
        others = len(self._server.all_connections) if self._server is not None else 0
        refusal = self.admission.check(address, others)
        if refusal is not None:
            self.admission.refused(address, "too many connections" if refusal.status == 503
                                   else "too many failed logins",
                                   f"charger '{cp_id}' from {address} refused: {refusal.reason} "
                                   f"(HTTP {refusal.status})")
            response = connection.respond(HTTPStatus(refusal.status), refusal.reason + "\n")
            response.headers["Retry-After"] = str(refusal.retry_after_s)
            return response
        if not cp_id:
            self.admission.refused(address, "no charge point id",
                                   f"connection from {address} refused: no charge point id in "
                                   f"the URL path {request.path!r}")
            return connection.respond(HTTPStatus.NOT_FOUND, "put the charge point id in the URL\n")
        config = self.charge_points.get(cp_id)
        if config is None and not self.config.ocpp.accept_unknown_charge_points:
            self.admission.refused(address, f"unknown charge point '{cp_id[:40]}'",
                                   f"charger '{cp_id}' from {address} refused: not in "
                                   "ocpp.charge_points and ocpp.accept_unknown_charge_points is "
                                   "false (add it to the config to let it in)")
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown charge point\n")
        if config is not None and config.password:
            header = request.headers.get("Authorization", "")
            user, password = None, None
            if header.lower().startswith("basic "):
                try:
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    pass
            if user != cp_id or password != config.password:
                self.admission.failed(address)
                why = "wrong Basic auth password" if header else "no Basic auth password"
                self.admission.refused(address, f"{why} for '{cp_id[:40]}'",
                                       f"charger '{cp_id}' refused: {why}")
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "charge point password needed\n")
                response.headers["WWW-Authenticate"] = 'Basic realm="OCPP", charset="UTF-8"'
                return response
        return None

    async def _connection(self, ws: ServerConnection) -> None:
        cp_id = self.charge_point_id(ws.request.path if ws.request else "")
        version = ws.subprotocol
        handler_class = ChargePoint16Handler if version == "ocpp1.6" else ChargePoint201Handler
        handler = handler_class(cp_id, ws, self)
        old = self.links.get(cp_id)
        if old is not None:
            logger.warning("charger '%s' connected again; dropping its old connection", cp_id)
            with contextlib.suppress(Exception):
                await old._connection.close()
        self.links[cp_id] = handler
        logger.info("charger '%s' connected (%s) from %s", cp_id, version,
                    ws.remote_address[0] if ws.remote_address else "?")
        for evse in self.evses_of(cp_id):
            evse.version = handler.version
            evse.online = True
            self._changed(evse)
        try:
            await handler.start()
        except ConnectionClosed:
            pass
        finally:
            if self.links.get(cp_id) is handler:
                del self.links[cp_id]
                for evse in self.evses_of(cp_id):
                    evse.online = False
                    evse.power_w = (0.0, 0.0, 0.0)
                    if evse.session is not None:
                        logger.warning("charger '%s' went offline during session %s on EVSE %d: "
                                       "flexibility withdrawn, it holds its default profile; the "
                                       "session resumes when it comes back", cp_id,
                                       evse.session.transaction_id, evse.evse_id)
                    self._changed(evse)
                logger.info("charger '%s' disconnected", cp_id)

    # --- EVSEs, cards, sessions ------------------------------------------------------------

    def evses_of(self, cp_id: str) -> list[Evse]:
        return [e for e in self.evses.values() if e.cp_id == cp_id]

    def _evse(self, cp_id: str, evse_id: int) -> Evse:
        key = (cp_id, evse_id)
        evse = self.evses.get(key)
        if evse is None:
            config = self.charge_points.get(cp_id) or ChargePoint(id=cp_id)
            evse = Evse(cp_id=cp_id, evse_id=evse_id, config=config)
            evse.vendor, evse.model = self.boot_info.get(cp_id, (None, None))
            link = self.links.get(cp_id)
            if link is not None:
                evse.online = True
                evse.version = link.version
            self.evses[key] = evse
            logger.info("EVSE %s: %.0f A max on %d phase(s)%s, limits sent in %s", evse.name,
                        config.max_current_a, config.phases,
                        f" ({config.phase})" if config.phases == 1 else "", config.limit_unit)
            if self.s2 is not None:
                self.s2.add(evse)
        return evse

    def evse_for(self, cp_id: str, evse_id: int) -> Evse:
        """The EVSE a charger's message names. An id outside the charge point's configured
        EVSEs (1..`evses`; 1..8 for an accepted unknown charge point) is refused with a
        CALLERROR and creates nothing: no EVSE, no S2 RM at the CEM."""
        config = self.charge_points.get(cp_id)
        most = config.evses if config is not None else MAX_EVSES_UNKNOWN
        if not isinstance(evse_id, int) or not 1 <= evse_id <= most:
            logger.warning("charger '%s' named EVSE/connector %s, it has %d configured: "
                           "refused (PropertyConstraintViolation), nothing created", cp_id,
                           evse_id, most)
            cause = (f"EVSE/connector {evse_id} is not one of this charge point's {most} "
                     "configured EVSE(s)")
            raise PropertyConstraintViolationError(description=cause, details={"cause": cause})
        return self._evse(cp_id, evse_id)

    def booted(self, cp_id: str, vendor: str | None, model: str | None) -> None:
        """Remember who made the charger (its EVSEs' S2 details say so from their next session)."""
        self.boot_info[cp_id] = (vendor, model)
        for evse in self.evses_of(cp_id):
            evse.vendor, evse.model = vendor, model
            self._changed(evse)

    def check_card(self, id_tag: str | None) -> tuple[str, ChargeCard | None]:
        """OCPP authorization status for a card: Accepted, Blocked or Invalid."""
        if not id_tag:
            return "Accepted", None
        card = self.cards.get(id_tag)
        if card is not None:
            return ("Accepted" if card.allowed else "Blocked"), card
        if self.config.ocpp.unknown_cards == "accept":
            return "Accepted", None
        return "Invalid", None

    def _card_words(self, id_tag: str | None, card: ChargeCard | None) -> str:
        if card is not None:
            return f"card {id_tag} ({card.name or 'no name'})"
        return f"unknown card {id_tag}" if id_tag else "no card"

    def _needs(self, started_at: datetime, card: ChargeCard | None) -> tuple[datetime, float, int, str]:
        """Departure, energy need (Wh), priority and where they came from (card, else defaults)."""
        defaults = self.config.ev_defaults
        tz = self.config.timezone
        source = "site defaults"
        energy_kwh = defaults.energy_kwh
        priority = defaults.priority
        if defaults.departure is not None:
            departure = next_local_time(started_at, defaults.departure, tz)
        else:
            departure = started_at + timedelta(hours=defaults.dwell_hours)
        if card is not None:
            source = f"charge card {card.name or card.id_tag}"
            priority = card.priority
            if card.energy_kwh is not None:
                energy_kwh = card.energy_kwh
            if card.departure is not None:
                departure = next_local_time(started_at, card.departure, tz)
        return departure, energy_kwh * 1000, priority, source

    def new_transaction_id(self) -> int:
        tx = self._next_tx
        self._next_tx += 1
        return tx

    async def begin_session(self, evse: Evse, transaction_id: str, id_tag: str | None,
                            started_at: datetime, meter_start_wh: float) -> EvSession | None:
        """Start (or, after a restart or reconnect, resume) the session of a transaction.

        None when the transaction already ended (a late message must not reopen its CDR).
        """
        if evse.session is not None and evse.session.transaction_id == transaction_id:
            return evse.session
        _status, card = self.check_card(id_tag)
        row = await self.records.find(evse.cp_id, transaction_id)
        open_one = evse.session
        if open_one is not None:
            if row is not None:  # a late message of an older transaction: the open one runs
                logger.info("%s: message for transaction %s while %s runs there; ignored",
                            evse.name, transaction_id, open_one.transaction_id)
                return None
            await self._close_superseded(evse, open_one, transaction_id, started_at)
        meter_start_unknown = False
        problem = register_problem(meter_start_wh) if row is None else None
        if problem is not None:
            report(evse, f"meterStart of transaction {transaction_id}: {problem}")
            meter_start_unknown = evse.register_wh is None
            meter_start_wh = evse.register_wh if evse.register_wh is not None else 0.0
        if row is not None:
            if not row.resumable:
                logger.info("%s: message for transaction %s, which has ended; ignored",
                            evse.name, transaction_id)
                return None
            if row.state == "closed":
                await self.records.reopen(row.id)
                logger.info("session %s on %s resumed (it had been closed at restart)",
                            transaction_id, evse.name)
            record_id, started_at, meter_start_wh = row.id, row.started_at, row.meter_start_wh
            if id_tag is None and row.id_tag:
                id_tag = row.id_tag
                _status, card = self.check_card(id_tag)
            meter_wh = row.meter_last_wh
        else:
            record_id = await self.records.start(
                cp_id=evse.cp_id, evse_id=evse.evse_id, transaction_id=transaction_id,
                id_tag=id_tag, card_name=card.name if card else None, started_at=started_at,
                meter_start_wh=meter_start_wh)
            meter_wh = meter_start_wh
        departure, need_wh, priority, source = self._needs(started_at, card)
        session = EvSession(
            record_id=record_id, transaction_id=transaction_id, id_tag=id_tag, card=card,
            started_at=started_at, meter_start_wh=meter_start_wh, meter_wh=meter_wh,
            departure=departure, energy_need_wh=need_wh, priority=priority, needs_source=source,
            card_max_current_a=card.max_current_a if card else None,
            meter_start_unknown=meter_start_unknown, received_at=_now())
        evse.session = session
        evse.plugged = True
        logger.info("session %s started on %s with %s: needs %.1f kWh by %s (from %s), "
                    "priority %d", transaction_id, evse.name, self._card_words(id_tag, card),
                    need_wh / 1000, departure.astimezone(ZoneInfo(self.config.timezone))
                    .strftime("%a %H:%M"), source, priority)
        self._changed(evse)
        return session

    async def _close_superseded(self, evse: Evse, session: EvSession, new_tx: str,
                                at: datetime) -> None:
        """A new transaction on an EVSE whose session is still open: that one ended unseen
        (its stop was lost); close it from its last plausible reading, saying why."""
        reason = (f"superseded: the charger started transaction {new_tx} on this EVSE while "
                  "this one was open")
        cdr = await self.records.stop(session.record_id, meter_stop_wh=None, at=at,
                                      reason=reason,
                                      price_eur_per_kwh=self.tariff.eur_per_kwh(at))
        logger.warning("%s: session %s was still open when transaction %s started: closed "
                       "(%.2f kWh)", evse.name, session.transaction_id, new_tx,
                       (cdr.energy_wh if cdr else 0.0) / 1000)
        evse.session = None

    async def set_session_tag(self, evse: Evse, id_tag: str) -> None:
        session = evse.session
        if session is None or session.id_tag == id_tag:
            return
        _, card = self.check_card(id_tag)
        session.id_tag, session.card = id_tag, card
        session.card_max_current_a = card.max_current_a if card else None
        if not session.needs_source.startswith("EV"):
            departure, need, priority, source = self._needs(session.started_at, card)
            session.departure, session.energy_need_wh = departure, need
            session.priority, session.needs_source = priority, source
        await self.records.set_tag(session.record_id, id_tag, card.name if card else None)
        logger.info("session %s on %s is charged to %s", session.transaction_id, evse.name,
                    self._card_words(id_tag, card))
        self._changed(evse)

    def charging_state(self, evse: Evse, state: str) -> None:
        """Learn from the charger's state whether the EV still takes power.

        SuspendedEV means the charger offers current and the EV draws none: its battery is
        full (or it takes no more for its own reasons). Its power is then of more use to the
        other EVs, so the EV is taken as full and the CEM pauses it; `offer_again` gives an EV
        that may only have paused its power back later. Only after the EV has charged: many
        EVs are SuspendedEV for a while after plug-in, before their battery management starts
        drawing. (A meter reading that shows the energy after the state counts too: see `meter`.)
        """
        session = evse.session
        if session is None:
            return
        session.charging_state = state
        if state == "Charging":
            session.times_full = 0
        if state == "SuspendedEV" and not session.ev_full and session.energy_wh > 0:
            session.ev_full, session.full_since = True, _now()
            session.times_full += 1
            logger.info("%s: the EV stopped drawing at %s A offered, %.2f kWh charged: taken "
                        "as full", evse.name,
                        "?" if session.limit_a is None else f"{session.limit_a:.1f}",
                        session.energy_wh / 1000)
            self._changed(evse)
        elif state == "Charging" and session.ev_full:
            session.ev_full, session.full_since = False, None
            logger.info("%s: the EV draws power again", evse.name)
            self._changed(evse)

    def offer_again(self, evse: Evse, now: datetime) -> bool:
        """Plan an EV taken as full again once `RETRY_FULL_AFTER` has passed, if it may only
        have paused (a car's own timer, battery conditioning): its need is not met and its SoC,
        if it tells one, is below `FULL_SOC_PCT`. Paused by the CEM, it could never show that
        it draws again. If it is full after all, the next SuspendedEV says so within a minute,
        and the next offer waits twice as long (30 min, 1 h, 2 h, then every 4 h).
        """
        session = evse.session
        if session is None or not session.ev_full or session.full_since is None:
            return False
        wait = RETRY_FULL_AFTER * 2 ** min(max(session.times_full - 1, 0), 3)
        if now - session.full_since < wait:
            return False
        if session.soc is not None and session.soc >= FULL_SOC_PCT:
            return False
        if session.energy_wh >= session.energy_need_wh - NEED_MET_MARGIN_WH:
            return False
        session.ev_full, session.full_since = False, None
        logger.info("%s: the EV has drawn nothing for %d min with %.1f of %.1f kWh charged; "
                    "offering it to the CEM again in case it only paused", evse.name,
                    wait.total_seconds() // 60, session.energy_wh / 1000,
                    session.energy_need_wh / 1000)
        self._changed(evse)
        return True

    async def meter(self, evse: Evse, at: datetime, energy_wh: float | None,
                    power_w: tuple[float, float, float] | None, soc: float | None) -> None:
        """Take a meter reading: EVSE power, session energy and cost, SoC (implausible values
        are dropped first: `plausibility.judge_reading`)."""
        now = _now()
        energy_wh, power_w, soc = judge_reading(evse, at, energy_wh, power_w, soc, now)
        at = min(at, now)
        if energy_wh is not None:
            evse.register_wh = energy_wh
        if power_w is not None:
            evse.power_w = power_w
            if evse.session is not None:
                evse.learn_phases(power_w)
        session = evse.session
        if session is not None:
            if energy_wh is not None and session.meter_start_unknown:
                logger.info("%s: session %s counts from %.0f Wh, its first plausible reading",
                            evse.name, session.transaction_id, energy_wh)
                session.meter_start_unknown = False
                session.meter_start_wh = session.meter_wh = energy_wh
                await self.records.rebase(session.record_id, energy_wh)
            if energy_wh is not None:
                session.meter_wh = max(session.meter_wh, energy_wh)
                session.meter_at, session.received_at = at, now
            if soc is not None:
                session.soc = soc
                if session.soc_first is None:
                    session.soc_first = (soc, session.energy_wh)
            await self.records.meter(session.record_id, meter_wh=energy_wh, at=at,
                                     power_w=evse.total_power_w if power_w is not None else None,
                                     soc=soc, price_eur_per_kwh=self.tariff.eur_per_kwh(at))
            if session.charging_state == "SuspendedEV" and not session.ev_full:
                self.charging_state(evse, "SuspendedEV")  # the energy came after the state
        self._changed(evse)

    async def end_session(self, evse: Evse | None, cp_id: str, transaction_id: str,
                          meter_stop_wh: float | None, at: datetime, reason: str) -> None:
        """Close a session: the CDR, and the charger's TxProfile for it. An implausible
        meterStop is not billed: the CDR keeps the last plausible reading."""
        running = evse.session if evse is not None and evse.session is not None and \
            evse.session.transaction_id == transaction_id else None
        if meter_stop_wh is not None and evse is not None:
            if running is not None and running.meter_start_unknown:
                judged = None
                reason += " (its meterStart was implausible: energy unknown)"
            else:
                if running is not None:
                    judged, _, _ = judge_reading(evse, at, meter_stop_wh, None, None, _now())
                else:
                    problem = register_problem(meter_stop_wh)
                    judged = None if problem else meter_stop_wh
                    if problem:
                        report(evse, f"meterStop of transaction {transaction_id}: {problem}")
                if judged is None:
                    reason += (f" (meterStop {meter_stop_wh:g} Wh implausible: the CDR keeps "
                               "the last plausible reading)")
            meter_stop_wh = judged
        row = await self.records.find(cp_id, transaction_id)
        if row is None:
            logger.warning("charger '%s' stopped transaction %s, which we never saw start",
                           cp_id, transaction_id)
            return
        if row.state == "closed":
            await self.records.reopen(row.id)  # the charger's reading replaces ours
        cdr = await self.records.stop(row.id, meter_stop_wh=meter_stop_wh, at=at, reason=reason,
                                      price_eur_per_kwh=self.tariff.eur_per_kwh(at))
        if cdr is not None:
            card = self.cards.get(cdr.id_tag or "")
            logger.info("session %s on %s/%d ended (%s): %.2f kWh, EUR %.2f, peak %.1f kW, %s",
                        transaction_id, cp_id, cdr.evse_id, reason, cdr.energy_wh / 1000,
                        cdr.cost_eur, cdr.peak_w / 1000, self._card_words(cdr.id_tag, card))
        if evse is not None and evse.session is not None and \
                evse.session.transaction_id == transaction_id:
            evse.session = None
            evse.power_w = (0.0, 0.0, 0.0)
            evse.phases_in_use = evse.phase_in_use = None
            link = self.links.get(cp_id)
            if link is not None:
                self.spawn(self.clear_tx_profile(evse), f"clear TxProfile on {evse.name}")
            self._changed(evse)

    # --- limits to chargers ----------------------------------------------------------------

    async def send_default_profile(self, cp_id: str) -> bool:
        """TxDefaultProfile at the safe limit for all EVSEs: what holds without us."""
        link = self.links.get(cp_id)
        if link is None:
            return False
        config = self.charge_points.get(cp_id) or ChargePoint(id=cp_id)
        amps = limits.round_down_tenth(min(self.config.ocpp.safe_limit_a, config.max_current_a))
        limit = limits.ProfileLimit(amps, config.limit_unit, config.phases)
        try:
            if isinstance(link, ChargePoint16Handler):
                response = await link.call(call16.SetChargingProfile(
                    connector_id=0, cs_charging_profiles=limits.tx_default_profile_v16(limit)),
                    suppress=False)
            else:
                response = await link.call(call201.SetChargingProfile(
                    evse_id=0, charging_profile=limits.tx_default_profile_v201(limit)),
                    suppress=False)
        except (OCPPError, TimeoutError, ConnectionClosed) as exc:
            logger.warning("charger '%s' did not take the default profile (%s): it may exceed "
                           "the safe limit when the CEM is gone", cp_id, exc)
            return False
        if response.status == "Accepted":
            logger.info("charger '%s': default profile set, %s per EVSE when nothing else is "
                        "known (safe limit)", cp_id, limit.describe())
            return True
        logger.warning("charger '%s' refused the default profile (%s)", cp_id, response.status)
        return False

    async def set_current(self, cp_id: str, evse_id: int, amps: float) -> LimitResult:
        """Send a TxProfile limiting the running session to `amps` (rounded to what works)."""
        evse = self.evses.get((cp_id, evse_id))
        link = self.links.get(cp_id)
        if evse is None or link is None or not evse.online:
            return LimitResult(False, 0.0, "charger offline")
        session = evse.session
        if session is None:
            return LimitResult(False, 0.0, "no charging session on this EVSE")
        min_a = max(self.config.ev_defaults.min_current_a, session.ev_min_current_a or 0)
        current = limits.charging_current(amps, evse.max_current_a, min_a)
        limit = limits.ProfileLimit(current, evse.config.limit_unit, evse.phases)
        try:
            if isinstance(link, ChargePoint16Handler):
                tx = int(session.transaction_id)
                response = await link.call(call16.SetChargingProfile(
                    connector_id=evse_id,
                    cs_charging_profiles=limits.tx_profile_v16(evse_id, tx, limit)), suppress=False)
            else:
                response = await link.call(call201.SetChargingProfile(
                    evse_id=evse_id, charging_profile=limits.tx_profile_v201(
                        evse_id, session.transaction_id, limit)), suppress=False)
        except (OCPPError, TimeoutError, ConnectionClosed) as exc:
            logger.warning("%s: limit %s not set: %s", evse.name, limit.describe(), exc)
            return LimitResult(False, current, f"charger did not answer: {exc}")
        if response.status != "Accepted":
            logger.warning("%s refused the limit %s (%s)", evse.name, limit.describe(),
                           response.status)
            return LimitResult(False, current, f"charger answered {response.status}")
        session.limit_a = current
        await self.records.set_limit(session.record_id, current)
        logger.info("%s: session %s limited to %s%s", evse.name, session.transaction_id,
                    limit.describe(), " (paused)" if current == 0 else "")
        self._changed(evse)
        return LimitResult(True, current, f"charger accepted {limit.describe()}")

    async def clear_tx_profile(self, evse: Evse) -> None:
        link = self.links.get(evse.cp_id)
        if link is None:
            return
        profile_id = limits.TX_PROFILE_ID_BASE + evse.evse_id
        try:
            if isinstance(link, ChargePoint16Handler):
                await link.call(call16.ClearChargingProfile(id=profile_id), suppress=False)
            else:
                await link.call(call201.ClearChargingProfile(charging_profile_id=profile_id),
                                suppress=False)
        except (OCPPError, TimeoutError, ConnectionClosed) as exc:
            logger.info("%s: could not clear the session profile (%s); the charger drops it "
                        "with the transaction anyway", evse.name, exc)


# --- charger handlers --------------------------------------------------------------------------


# OCPP-J 1.6 (4.2.3) spells these differently from 2.0.1, which the ocpp library uses for both.
ERROR_CODES_16 = {"FormatViolation": "FormationViolation",
                  "OccurrenceConstraintViolation": "OccurenceConstraintViolation"}


def _frame_error(raw: str, version: str, error: OCPPError) -> str | None:
    """A CallError for a frame that cannot be parsed, with its message id when readable
    (else "-1", as OCPP-J prescribes); None for a broken answer (CallResult / CallError)."""
    if frames.broken_answer(raw):
        return None  # a broken answer: nothing to answer to
    unique_id = "-1"
    try:
        frame = json.loads(raw)
        if isinstance(frame, list) and len(frame) > 1 and isinstance(frame[1], str):
            if frame[0] in (3, 4):
                return None  # a broken answer: nothing to answer to
            unique_id = frame[1]
    except (ValueError, TypeError, RecursionError):  # not JSON, not text, too deep
        pass
    if version == "2.0.1":
        code = "RpcFrameworkError"  # OCPP-J 2.0.1 4.3: message is not a valid RPC request
    else:
        code = ERROR_CODES_16.get(error.code, error.code)
    return CallError(unique_id, code, error.description, error.details or {}).to_json()


class FrameLog:
    """The ocpp library's logger, quieter: frames at DEBUG, handler errors as one plain line.

    The library logs every frame at INFO and a traceback for every malformed payload it answers
    with a CallError; both drown the decisions this RM logs.
    """

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def debug(self, msg: str, *args: Any) -> None:
        self._logger.debug(msg, *args)

    info = debug

    def warning(self, msg: str, *args: Any) -> None:
        self._logger.warning(msg, *args)

    def error(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.warning(msg, *args)

    def exception(self, msg: str, *args: Any, **_: Any) -> None:
        error = sys.exc_info()[1]
        self._logger.warning(msg + ": %s", *args, error)


class _CsmsSide:
    """What both versions share: the central system and frame-level error answers."""

    version = ""
    id: str
    csms: OcppCentralSystem

    async def _send(self, message: str) -> None:
        """Send a frame; CallErrors to 1.6 chargers use the 1.6 error code names."""
        if self.version == "1.6" and message.startswith("[4,"):
            frame = json.loads(message)
            frame[2] = ERROR_CODES_16.get(frame[2], frame[2])
            message = json.dumps(frame, separators=(",", ":"))
        await super()._send(message)  # type: ignore[misc]

    async def route_message(self, raw_msg: str | bytes) -> None:
        """Route one frame; whatever it holds, the connection stays open (`frames`)."""
        try:
            await self._route(raw_msg)
        except ConnectionClosed:
            raise  # the charger left: the connection ends anyway
        except Exception as exc:  # a frame must never end the charger's connection
            self._bad_frames().bad_frame(self.id, f"it could not be handled ({exc!r:.120})",
                                         False)

    def _bad_frames(self) -> frames.FrameLog:
        log: frames.FrameLog | None = getattr(self, "_frame_log", None)
        if log is None:
            log = self._frame_log = frames.FrameLog(logger)
        return log

    async def _route(self, raw_msg: str | bytes) -> None:
        problem = frames.screen(raw_msg)
        if problem is not None:
            self._bad_frames().bad_frame(self.id, problem.description,
                                         problem.unique_id is not None)
            if problem.unique_id is not None:
                await self._send(json.dumps([4, problem.unique_id, problem.code,
                                             problem.description, {}], separators=(",", ":")))
            return
        assert isinstance(raw_msg, str)
        try:
            message = unpack(raw_msg)
        except OCPPError as error:
            answer = _frame_error(raw_msg, self.version, error)
            cause = error.details.get("cause", error.code) if error.details else error.code
            self._bad_frames().bad_frame(self.id, f"{cause}: {raw_msg:.120}",
                                         answer is not None)
            if answer is not None:
                await self._send(answer)
            return
        if isinstance(message, Call) and message.action not in self.route_map:  # type: ignore[attr-defined]
            # OCPP-J (1.6 4.2.3, 2.0.1 4.3): an action we do not know is NotImplemented, a known
            # one we do not handle is NotSupported (the ocpp library swaps the two).
            actions = Action16 if self.version == "1.6" else Action201
            known = message.action in {a.value for a in actions}
            error_class = NotSupportedError if known else OcppNotImplementedError
            refusal = error_class(details={"cause": f"{message.action} is "
                                           f"{'not handled' if known else 'not an OCPP action'} "
                                           f"by this central system (OCPP {self.version})"})
            logger.info("charger '%s' sent %s: answered %s", self.id, message.action,
                        refusal.code)
            await self._send(message.create_call_error(refusal).to_json())
            return
        await super().route_message(raw_msg)  # type: ignore[misc]


def _split_power(evse: Evse, per_phase: dict[str, float], total: float | None) -> tuple[float, float, float] | None:
    if per_phase:
        return (per_phase.get("L1", 0.0), per_phase.get("L2", 0.0), per_phase.get("L3", 0.0))
    if total is None:
        return None
    if evse.phases == 3:
        return (total / 3, total / 3, total / 3)
    shares = {"L1": (total, 0.0, 0.0), "L2": (0.0, total, 0.0), "L3": (0.0, 0.0, total)}
    return shares[evse.phase]


def read_meter_values(evse: Evse, meter_values: Iterable[dict[str, Any]],
                      ) -> tuple[datetime, float | None, tuple[float, float, float] | None, float | None]:
    """Energy (Wh), per-phase power (W) and SoC (%) from 1.6 / 2.0.1 meter values (snake case)."""
    at = _now()
    energy = soc = total = None
    per_phase: dict[str, float] = {}
    current: dict[str, float] = {}
    for mv in meter_values:
        at = _parse_time(mv.get("timestamp"))
        for sv in mv.get("sampled_value", []):
            try:
                value = float(sv.get("value"))
            except (TypeError, ValueError):
                continue
            measurand = sv.get("measurand") or ENERGY
            unit = (sv.get("unit") or (sv.get("unit_of_measure") or {}).get("unit") or "").lower()
            phase = (sv.get("phase") or "")[:2]
            if measurand == ENERGY and not phase:
                energy = value * 1000 if unit == "kwh" else value
            elif measurand == "Power.Active.Import":
                watts = value * 1000 if unit == "kw" else value
                if phase in ("L1", "L2", "L3"):
                    per_phase[phase] = watts
                elif not phase:
                    total = watts
            elif measurand == "Current.Import" and phase in ("L1", "L2", "L3"):
                current[phase] = value
            elif measurand == "SoC":
                soc = value
    if not per_phase and total is None and current:
        per_phase = {ph: amps * limits.VOLTAGE_V for ph, amps in current.items()}
    return at, energy, _split_power(evse, per_phase, total), soc


class ChargePoint16Handler(_CsmsSide, ChargePoint16):
    """An OCPP 1.6J charger as the central system sees it."""

    version = "1.6"

    def __init__(self, cp_id: str, connection: ServerConnection, csms: OcppCentralSystem) -> None:
        super().__init__(cp_id, connection, response_timeout=csms.response_timeout_s,
                         logger=FrameLog("resource_managers.ocpp.frames"))
        self.csms = csms

    @on(Action16.boot_notification)
    async def on_boot(self, charge_point_vendor: str, charge_point_model: str,
                      **details: Any) -> result16.BootNotification:
        logger.info("charger '%s' booted: %s %s (OCPP 1.6J)%s", self.id, charge_point_vendor,
                    charge_point_model, f", firmware {details['firmware_version']}"
                    if details.get("firmware_version") else "")
        self.csms.booted(self.id, charge_point_vendor, charge_point_model)
        self.csms._evse(self.id, 1)
        return result16.BootNotification(current_time=_iso(_now()),
                                         interval=self.csms.config.ocpp.heartbeat_interval_s,
                                         status="Accepted")

    @after(Action16.boot_notification)
    async def after_boot(self, **_: Any) -> None:
        self.csms.spawn(self.csms.send_default_profile(self.id), f"default profile {self.id}")

    @on(Action16.heartbeat)
    async def on_heartbeat(self) -> result16.Heartbeat:
        return result16.Heartbeat(current_time=_iso(_now()))

    @on(Action16.status_notification)
    async def on_status(self, connector_id: int, error_code: str, status: str,
                        **_: Any) -> result16.StatusNotification:
        if connector_id > 0:
            evse = self.csms.evse_for(self.id, connector_id)
            if evse.status != status:
                logger.info("%s is %s%s", evse.name, status,
                            "" if error_code == "NoError" else f" (error {error_code})")
            evse.status = status
            evse.plugged = status in PLUGGED_16
            evse.online = True
            if status in IN_TRANSACTION_16:
                await self.csms.resume_if_charging(evse)
            self.csms.charging_state(evse, status)
            self.csms._changed(evse)
        return result16.StatusNotification()

    @on(Action16.authorize)
    async def on_authorize(self, id_tag: str) -> result16.Authorize:
        status, card = self.csms.check_card(id_tag)
        logger.info("charger '%s': %s %s", self.id, self.csms._card_words(id_tag, card),
                    "accepted" if status == "Accepted" else f"refused ({status})")
        return result16.Authorize(id_tag_info={"status": status})

    @on(Action16.start_transaction)
    async def on_start(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str,
                       **_: Any) -> result16.StartTransaction:
        status, card = self.csms.check_card(id_tag)
        tx = self.csms.new_transaction_id()
        if status != "Accepted":
            logger.info("charger '%s': transaction refused for %s (%s)", self.id,
                        self.csms._card_words(id_tag, card), status)
            return result16.StartTransaction(transaction_id=tx, id_tag_info={"status": status})
        evse = self.csms.evse_for(self.id, connector_id)
        await self.csms.begin_session(evse, str(tx), id_tag, _parse_time(timestamp),
                                      float(meter_start))
        return result16.StartTransaction(transaction_id=tx, id_tag_info={"status": "Accepted"})

    @on(Action16.stop_transaction)
    async def on_stop(self, meter_stop: int, timestamp: str, transaction_id: int,
                      reason: str | None = None, **_: Any) -> result16.StopTransaction:
        evse = next((e for e in self.csms.evses_of(self.id) if e.session is not None
                     and e.session.transaction_id == str(transaction_id)), None)
        await self.csms.end_session(evse, self.id, str(transaction_id), float(meter_stop),
                                    _parse_time(timestamp), reason or "Local")
        return result16.StopTransaction(id_tag_info={"status": "Accepted"})

    @on(Action16.meter_values)
    async def on_meter_values(self, connector_id: int, meter_value: list[dict[str, Any]],
                              transaction_id: int | None = None) -> result16.MeterValues:
        if connector_id > 0:
            evse = self.csms.evse_for(self.id, connector_id)
            at, energy, power, soc = read_meter_values(evse, meter_value)
            if transaction_id is not None and (evse.session is None or
                                               evse.session.transaction_id != str(transaction_id)):
                row = await self.csms.records.find(self.id, str(transaction_id))
                if row is not None and row.resumable:  # from before a restart or a reconnect
                    await self.csms.begin_session(evse, str(transaction_id), row.id_tag,
                                                  row.started_at, row.meter_start_wh)
            await self.csms.meter(evse, at, energy, power, soc)
        return result16.MeterValues()


class ChargePoint201Handler(_CsmsSide, ChargePoint201):
    """An OCPP 2.0.1 charging station as the central system sees it."""

    version = "2.0.1"

    def __init__(self, cp_id: str, connection: ServerConnection, csms: OcppCentralSystem) -> None:
        super().__init__(cp_id, connection, response_timeout=csms.response_timeout_s,
                         logger=FrameLog("resource_managers.ocpp.frames"))
        self.csms = csms

    @on(Action201.boot_notification)
    async def on_boot(self, charging_station: dict[str, Any], reason: str,
                      **_: Any) -> result201.BootNotification:
        logger.info("charger '%s' booted: %s %s (OCPP 2.0.1, %s)", self.id,
                    charging_station.get("vendor_name"), charging_station.get("model"), reason)
        self.csms.booted(self.id, charging_station.get("vendor_name"), charging_station.get("model"))
        self.csms._evse(self.id, 1)
        return result201.BootNotification(current_time=_iso(_now()),
                                          interval=self.csms.config.ocpp.heartbeat_interval_s,
                                          status="Accepted")

    @after(Action201.boot_notification)
    async def after_boot(self, **_: Any) -> None:
        self.csms.spawn(self.csms.send_default_profile(self.id), f"default profile {self.id}")

    @on(Action201.heartbeat)
    async def on_heartbeat(self) -> result201.Heartbeat:
        return result201.Heartbeat(current_time=_iso(_now()))

    @on(Action201.status_notification)
    async def on_status(self, timestamp: str, connector_status: str, evse_id: int,
                        connector_id: int, **_: Any) -> result201.StatusNotification:
        evse = self.csms.evse_for(self.id, evse_id)
        if evse.status != connector_status:
            logger.info("%s is %s", evse.name, connector_status)
        evse.status = connector_status
        evse.plugged = connector_status == "Occupied"
        evse.online = True
        self.csms._changed(evse)
        return result201.StatusNotification()

    @on(Action201.authorize)
    async def on_authorize(self, id_token: dict[str, Any], **_: Any) -> result201.Authorize:
        status, card = self.csms.check_card(id_token.get("id_token"))
        logger.info("charger '%s': %s %s", self.id,
                    self.csms._card_words(id_token.get("id_token"), card),
                    "accepted" if status == "Accepted" else f"refused ({status})")
        return result201.Authorize(id_token_info={"status": status})

    @on(Action201.transaction_event)
    async def on_transaction_event(self, event_type: str, timestamp: str, trigger_reason: str,
                                   seq_no: int, transaction_info: dict[str, Any],
                                   meter_value: list[dict[str, Any]] | None = None,
                                   evse: dict[str, Any] | None = None,
                                   id_token: dict[str, Any] | None = None,
                                   cable_max_current: int | None = None,
                                   number_of_phases_used: int | None = None,
                                   **_: Any) -> result201.TransactionEvent:
        tx = str(transaction_info["transaction_id"])
        id_tag = id_token.get("id_token") if id_token else None
        status, card = self.csms.check_card(id_tag)
        answer = result201.TransactionEvent(
            id_token_info={"status": status} if id_token else None)
        target = None
        if evse is not None:
            target = self.csms.evse_for(self.id, int(evse["id"]))
        else:
            target = next((e for e in self.csms.evses_of(self.id) if e.session is not None
                           and e.session.transaction_id == tx), None)
        at = _parse_time(timestamp)
        energy = power = soc = None
        if meter_value and target is not None:
            at, energy, power, soc = read_meter_values(target, meter_value)
        if event_type == "Ended":
            await self.csms.end_session(target, self.id, tx, energy, at,
                                        transaction_info.get("stopped_reason") or "Local")
            return answer
        if target is None:
            logger.warning("charger '%s': transaction %s without an EVSE; ignored", self.id, tx)
            return answer
        if status != "Accepted":
            logger.info("charger '%s': %s refused (%s) for transaction %s", self.id,
                        self.csms._card_words(id_tag, card), status, tx)
            return answer
        if target.session is None or target.session.transaction_id != tx:
            if await self.csms.begin_session(target, tx, id_tag, at, energy or 0.0) is None:
                return answer
        elif id_tag:
            await self.csms.set_session_tag(target, id_tag)
        session = target.session
        assert session is not None
        if cable_max_current:
            session.cable_max_current_a = float(cable_max_current)
        if number_of_phases_used:
            target.phases_in_use = min(int(number_of_phases_used), target.config.phases)
        if transaction_info.get("charging_state"):
            self.csms.charging_state(target, str(transaction_info["charging_state"]))
        if meter_value:
            await self.csms.meter(target, at, energy, power, soc)
        return answer

    @on(Action201.meter_values)
    async def on_meter_values(self, evse_id: int, meter_value: list[dict[str, Any]],
                              **_: Any) -> result201.MeterValues:
        if evse_id > 0:
            evse = self.csms.evse_for(self.id, evse_id)
            at, energy, power, soc = read_meter_values(evse, meter_value)
            await self.csms.meter(evse, at, energy if evse.session else None, power, soc)
        return result201.MeterValues()

    @on(Action201.notify_ev_charging_needs)
    async def on_charging_needs(self, charging_needs: dict[str, Any], evse_id: int,
                                **_: Any) -> result201.NotifyEVChargingNeeds:
        evse = self.csms.evse_for(self.id, evse_id)
        session = evse.session
        if session is None:
            logger.info("%s: EV charging needs before a transaction; ignored", evse.name)
            return result201.NotifyEVChargingNeeds(status="Rejected")
        ac = charging_needs.get("ac_charging_parameters") or {}
        problem = needs_problem(ac)
        if problem is not None:
            report(evse, f"NotifyEVChargingNeeds: {problem}")
            return result201.NotifyEVChargingNeeds(status="Rejected")
        if charging_needs.get("departure_time"):
            session.departure = _parse_time(charging_needs["departure_time"])
        if ac.get("energy_amount"):
            session.energy_need_wh = session.energy_wh + float(ac["energy_amount"])
        if ac.get("ev_max_current"):
            session.ev_max_current_a = float(ac["ev_max_current"])
        if ac.get("ev_min_current"):
            session.ev_min_current_a = float(ac["ev_min_current"])
        session.needs_source = "EV (NotifyEVChargingNeeds)"
        logger.info("%s: the EV asks for %.1f kWh more by %s, %s A max", evse.name,
                    (session.energy_need_wh - session.energy_wh) / 1000,
                    session.departure.astimezone(ZoneInfo(self.csms.config.timezone))
                    .strftime("%a %H:%M"), ac.get("ev_max_current", "?"))
        self.csms._changed(evse)
        return result201.NotifyEVChargingNeeds(status="Accepted")
