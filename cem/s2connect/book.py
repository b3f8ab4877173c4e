"""What the CEM keeps about S2 Connect, in its store (tables ``s2c_*``, store schema 3).

Its own node id, the pairing codes it shows (the token itself: the server needs it to compute
the HMAC; a dynamic code is gone after 5 minutes or one pairing), the nodes it is paired with
and, per node, only the SHA-256 of the active access token and of pending ones. Used by the
running CEM and by `cem pair ...` (another process; the store's WAL lets both in).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cem.s2connect.pairing import PairingToken
from cem.store import Store
from sitekit.s2connect import (
    DYNAMIC_CODE_LENGTH,
    DYNAMIC_CODE_LIFETIME_S,
    PENDING_TOKEN_S,
    STATIC_CODE_LENGTH,
    EndpointDescription,
    NodeDescription,
    new_pairing_token,
)


@dataclass
class PairingRow:
    """One paired (or unpaired) node as stored."""

    node_id: str
    role: str
    description: dict[str, Any]
    endpoint: dict[str, Any]
    paired_at: float
    state: str
    unpaired_at: float | None
    unpaired_by: str | None
    token_hash: str | None
    last_session_at: float | None
    rm_id: str | None
    peer_url: str | None

    @property
    def label(self) -> str:
        d = self.description
        name = d.get("userDefinedName") or f"{d.get('brand', '?')} {d.get('modelName', '')}"
        return name.strip()


_ROW = ("node_id, role, description, endpoint, paired_at, state, unpaired_at, unpaired_by, "
        "token_hash, last_session_at, rm_id, peer_url")


def _row(r: tuple[Any, ...]) -> PairingRow:
    return PairingRow(r[0], r[1], json.loads(r[2] or "{}"), json.loads(r[3] or "{}"), r[4],
                      r[5], r[6], r[7], r[8], r[9], r[10], r[11])


class PairingBook:
    """The s2c_* tables of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- this CEM's node -------------------------------------------------------------------------

    async def node_id(self) -> uuid.UUID:
        """This CEM's node id, made once and kept."""
        rows = await self.store.query("SELECT node_id FROM s2c_node WHERE id = 1")
        if rows:
            return uuid.UUID(rows[0][0])
        await self.store.execute(("INSERT OR IGNORE INTO s2c_node (id, node_id, created_at) "
                                  "VALUES (1, ?, ?)", (str(uuid.uuid4()), time.time())))
        rows = await self.store.query("SELECT node_id FROM s2c_node WHERE id = 1")
        return uuid.UUID(rows[0][0])

    async def set_pairing_url(self, url: str | None) -> None:
        await self.store.execute(("UPDATE s2c_node SET pairing_url = ? WHERE id = 1", (url,)))

    async def pairing_url(self) -> str | None:
        rows = await self.store.query("SELECT pairing_url FROM s2c_node WHERE id = 1")
        return rows[0][0] if rows else None

    # --- pairing codes ------------------------------------------------------------------------------

    async def new_code(self, *, static: bool = False, now: float | None = None) -> str:
        """A dynamic code (replaces the previous one, valid 5 min, one pairing), or the static
        code (made once, kept until replaced with `replace=True`)."""
        now = time.time() if now is None else now
        if static:
            rows = await self.store.query("SELECT code FROM s2c_codes WHERE kind = 'static'")
            if rows:
                return str(rows[0][0])
            code = new_pairing_token(STATIC_CODE_LENGTH)
            await self.store.execute(("INSERT INTO s2c_codes (kind, code, created_at) "
                                      "VALUES ('static', ?, ?)", (code, now)))
            return code
        code = new_pairing_token(DYNAMIC_CODE_LENGTH)
        await self.store.execute((
            "INSERT INTO s2c_codes (kind, code, created_at, expires_at) VALUES ('dynamic', ?, ?, ?)"
            " ON CONFLICT(kind) DO UPDATE SET code = excluded.code, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at", (code, now, now + DYNAMIC_CODE_LIFETIME_S)))
        return code

    async def enter_code(self, node_id: str, code: str, now: float | None = None) -> None:
        """A code the user typed in for a client-only RM (it long-polls; we are the initiator)."""
        now = time.time() if now is None else now
        await self.store.execute((
            "INSERT OR REPLACE INTO s2c_initiations (node_id, code, created_at, expires_at)"
            " VALUES (?, ?, ?, ?)", (node_id, code, now, now + DYNAMIC_CODE_LIFETIME_S)))

    async def entered_for(self, node_id: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        rows = await self.store.query("SELECT code FROM s2c_initiations WHERE node_id = ? AND "
                                      "expires_at > ?", (node_id, now))
        return str(rows[0][0]) if rows else None

    async def valid_token(self, client_node_id: str | None,
                          now: float | None = None) -> PairingToken | None:
        """The token a requestPairing from `client_node_id` is checked against, if any."""
        now = time.time() if now is None else now
        if client_node_id is not None:
            entered = await self.entered_for(client_node_id, now)
            if entered is not None:
                return PairingToken(entered, "entered")
        rows = await self.store.query(
            "SELECT kind, code FROM s2c_codes WHERE expires_at IS NULL OR expires_at > ? "
            "ORDER BY kind = 'static'", (now,))
        return PairingToken(str(rows[0][1]), str(rows[0][0])) if rows else None

    async def consume(self, token: PairingToken, client_node_id: str) -> None:
        """A dynamic or entered code pairs once."""
        if token.kind == "dynamic":
            await self.store.execute(("DELETE FROM s2c_codes WHERE kind = 'dynamic' AND code = ?",
                                      (token.token,)))
        elif token.kind == "entered":
            await self.store.execute(("DELETE FROM s2c_initiations WHERE node_id = ?",
                                      (client_node_id,)))

    # --- pairings ------------------------------------------------------------------------------------

    async def save_pairing(self, node: NodeDescription, endpoint: EndpointDescription,
                           token_hash: str, *, now: float | None = None,
                           peer_url: str | None = None, peer_ca: str | None = None) -> None:
        """Paired (again): the node's old tokens are gone, this one is active."""
        now = time.time() if now is None else now
        node_id = str(node.id)
        await self.store.execute(
            ("DELETE FROM s2c_pending WHERE node_id = ?", (node_id,)),
            ("INSERT OR REPLACE INTO s2c_pairings (node_id, role, description, endpoint, "
             "paired_at, state, token_hash, peer_url, peer_ca) "
             "VALUES (?, ?, ?, ?, ?, 'paired', ?, ?, ?)",
             (node_id, node.role, json.dumps(node.to_json()), json.dumps(endpoint.to_json()), now,
              token_hash, peer_url, peer_ca)))

    async def pairing(self, node_id: str) -> PairingRow | None:
        rows = await self.store.query(f"SELECT {_ROW} FROM s2c_pairings WHERE node_id = ?",
                                      (node_id,))
        return _row(rows[0]) if rows else None

    async def pairings(self) -> list[PairingRow]:
        rows = await self.store.query(f"SELECT {_ROW} FROM s2c_pairings ORDER BY paired_at")
        return [_row(r) for r in rows]

    async def find(self, who: str) -> list[PairingRow]:
        """Paired nodes matching a node id, an RM's resource id or a name."""
        out = []
        for row in await self.pairings():
            if row.state != "paired":
                continue
            if who in (row.node_id, row.rm_id, row.description.get("userDefinedName"),
                       row.label):
                out.append(row)
        return out

    async def update_description(self, node: NodeDescription) -> None:
        await self.store.execute(("UPDATE s2c_pairings SET description = ? WHERE node_id = ?",
                                  (json.dumps(node.to_json()), str(node.id))))

    async def set_rm_id(self, node_id: str, rm_id: str) -> None:
        await self.store.execute(("UPDATE s2c_pairings SET rm_id = ? WHERE node_id = ?",
                                  (rm_id, node_id)))

    async def unpair(self, node_id: str, by: str, now: float | None = None) -> bool:
        """Forget the node's tokens; it stays listed as unpaired (initiateSession then answers
        NoLongerPaired)."""
        now = time.time() if now is None else now
        counts = await self.store.execute(
            ("UPDATE s2c_pairings SET state = 'unpaired', unpaired_at = ?, unpaired_by = ?, "
             "token_hash = NULL WHERE node_id = ? AND state = 'paired'", (now, by, node_id)),
            ("DELETE FROM s2c_pending WHERE node_id = ?", (node_id,)))
        return counts[0] > 0

    async def unpaired_since(self, since: float) -> list[tuple[str, float]]:
        rows = await self.store.query("SELECT node_id, unpaired_at FROM s2c_pairings WHERE "
                                      "state = 'unpaired' AND unpaired_at > ?", (since,))
        return [(str(r[0]), float(r[1])) for r in rows]

    # --- access tokens -------------------------------------------------------------------------------

    async def add_pending(self, node_id: str, token_hash: str, s2_version: str,
                          now: float | None = None) -> None:
        now = time.time() if now is None else now
        await self.store.execute(
            ("DELETE FROM s2c_pending WHERE node_id = ? AND created_at < ?",
             (node_id, now - PENDING_TOKEN_S)),
            ("INSERT INTO s2c_pending (token_hash, node_id, s2_version, created_at) "
             "VALUES (?, ?, ?, ?)", (token_hash, node_id, s2_version, now)))

    async def take_pending(self, token_hash: str) -> tuple[str, str, float] | None:
        """(node id, S2 version, issued at) of a pending token, which is gone afterwards."""
        rows = await self.store.query("SELECT node_id, s2_version, created_at FROM s2c_pending "
                                      "WHERE token_hash = ?", (token_hash,))
        if not rows:
            return None
        counts = await self.store.execute(("DELETE FROM s2c_pending WHERE token_hash = ?",
                                           (token_hash,)))
        if counts[0] == 0:  # taken by a concurrent confirm
            return None
        return str(rows[0][0]), str(rows[0][1]), float(rows[0][2])

    async def activate(self, node_id: str, token_hash: str, now: float | None = None) -> bool:
        """The confirmed token becomes the node's only access token."""
        now = time.time() if now is None else now
        counts = await self.store.execute(
            ("UPDATE s2c_pairings SET token_hash = ?, last_session_at = ? WHERE node_id = ? AND "
             "state = 'paired'", (token_hash, now, node_id)))
        return counts[0] > 0
