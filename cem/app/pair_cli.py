"""`cem pair ...`: S2 Connect pairing from the command line (works beside a running `cem run`).

- `cem pair code [--static] [--json]`: a pairing code for an RM to enter (dynamic: 10
  characters from the CSPRNG, 5 minutes, one pairing; static: 16 characters, kept), with the
  pairing URL and this CEM's node id.
- `cem pair list`, `cem pair remove RM`: paired RMs; removing one makes its next
  initiateSession fail with NoLongerPaired, and a running CEM ends its session within a second.
- `cem pair rm --url URL --code CODE`: the CEM pairs as the HTTPS client with an RM that shows
  a code (the CEM pins the RM's CA after a good HMAC); `--node ID --code CODE` instead hands the
  code to a running CEM for a client-only RM that long-polls it.
- `cem pair discover`: RMs that announce themselves over DNS-SD.

Mistakes (no store, unknown RM, a refused pairing) end with a message and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cem.site.config import SiteConfig

console = Console()
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


async def _open(db: Path) -> Any:
    from cem.store import Store

    try:
        return await Store.open(db)
    except Exception as exc:
        raise _fail(f"cannot open the store {db}: {exc}") from exc


def pairing_url_of(site: SiteConfig, stored: str | None) -> str:
    """The running CEM's pairing URL, or the one the config gives."""
    if stored:
        return stored
    from cem.app.s2connect_api import BASE, url_host

    host = url_host(site)
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{site.s2connect.port}{BASE}"


def code_command(site: SiteConfig, db: Path, *, static: bool, json_out: bool) -> None:
    from cem.s2connect.book import PairingBook

    async def work() -> tuple[str, str, str]:
        store = await _open(db)
        try:
            book = PairingBook(store)
            node_id = await book.node_id()
            code = await book.new_code(static=static)
            return code, pairing_url_of(site, await book.pairing_url()), str(node_id)
        finally:
            await store.close()

    code, url, node_id = asyncio.run(work())
    if json_out:
        print(json.dumps({"pairing_code": code, "pairing_url": url, "node_id": node_id,
                          "static": static}))
        return
    console.print(f"pairing code: [bold]{code}[/]" + ("" if static else
                                                      "  (valid 5 minutes, one pairing)"))
    console.print(f"pairing URL:  {url}", highlight=False)
    console.print(f"CEM node id:  {node_id}", highlight=False)
    if not site.s2connect.enabled:
        err.print("note: [s2connect] enabled = false in this config: `cem run` will not accept "
                  "the code until S2 Connect is enabled", markup=False)


def list_command(db: Path, json_out: bool) -> None:
    from cem.s2connect.book import PairingBook

    async def work() -> list[Any]:
        store = await _open(db)
        try:
            return await PairingBook(store).pairings()
        finally:
            await store.close()

    rows = asyncio.run(work())
    if json_out:
        print(json.dumps([{"node_id": r.node_id, "name": r.label, "role": r.role,
                           "state": r.state, "rm_id": r.rm_id, "paired_at": r.paired_at,
                           "last_session_at": r.last_session_at, "unpaired_by": r.unpaired_by}
                          for r in rows]))
        return
    if not rows:
        console.print("no paired RMs")
        return
    table = Table("node id", "RM", "resource id", "state", "paired", "last session")
    from cem.store import utc_iso

    for r in rows:
        table.add_row(r.node_id, r.label, r.rm_id or "-",
                      r.state + (f" (by {r.unpaired_by})" if r.unpaired_by else ""),
                      utc_iso(r.paired_at)[:19], utc_iso(r.last_session_at)[:19]
                      if r.last_session_at else "-")
    console.print(table)


def remove_command(db: Path, who: str) -> None:
    from cem.s2connect.book import PairingBook

    async def work() -> str:
        store = await _open(db)
        try:
            book = PairingBook(store)
            found = await book.find(who)
            if not found:
                raise _fail(f"no paired RM {who!r}: see `cem pair list`")
            if len(found) > 1:
                raise _fail(f"{who!r} names {len(found)} RMs: use the node id")
            await book.unpair(found[0].node_id, "cem")
            return f"{found[0].label} ({found[0].node_id})"
        finally:
            await store.close()

    console.print(f"unpaired {asyncio.run(work())}; a running CEM ends its session",
                  highlight=False)


def rm_command(site: SiteConfig, db: Path, *, url: str | None, node: str | None,
               code: str) -> None:
    """The CEM as the initiator: pair an RM that shows `code`."""
    from sitekit.s2connect import parse_pairing_code

    try:
        parse_pairing_code(code)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if (url is None) == (node is None):
        raise _fail("give --url (an RM with a pairing server) or --node (a client-only RM that "
                    "long-polls this CEM)")
    if node is not None:
        _enter_code(db, node, code)
        return
    assert url is not None
    label = asyncio.run(_pair_as_client(site, db, url, code))
    console.print(f"paired with {label}", highlight=False)


def _enter_code(db: Path, node: str, code: str) -> None:
    from cem.s2connect.book import PairingBook

    try:
        uuid.UUID(node)
    except ValueError as exc:
        raise _fail(f"{node!r} is not a node id (a UUID)") from exc

    async def work() -> None:
        store = await _open(db)
        try:
            await PairingBook(store).enter_code(node, code)
        finally:
            await store.close()

    asyncio.run(work())
    console.print(f"code handed to the running CEM: RM {node} is told to pair when it next "
                  "polls (within 5 minutes)", highlight=False)


async def _pair_as_client(site: SiteConfig, db: Path, url: str, code: str) -> str:
    from cem.app.s2connect_api import load_tls
    from cem.s2connect.book import PairingBook
    from cem.s2connect.service import S2_JSON_VERSIONS, node_description
    from sitekit.s2connect import (
        ConnectionDetails,
        EndpointDescription,
        NodeDescription,
        fingerprint_hex,
        new_access_token,
        token_hash,
    )
    from sitekit.s2connect_client import S2ConnectError, pair

    store = await _open(db)
    try:
        book = PairingBook(store)
        node_id = await book.node_id()
        try:
            tls = await asyncio.to_thread(load_tls, site)
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot make or read the CEM's certificates: {exc}") from exc
        session_url = pairing_url_of(site, await book.pairing_url())
        token = new_access_token()

        def details(server: NodeDescription, endpoint: EndpointDescription) -> ConnectionDetails:
            return ConnectionDetails(initiateSessionUrl=session_url, accessToken=token,
                                     certificateFingerprint={
                                         "SHA256": fingerprint_hex(tls.ca_der)})

        try:
            pairing = await pair(url, code, node=node_description(node_id, site.site.name),
                                 endpoint=EndpointDescription(name=site.s2connect.endpoint_name,
                                                              deployment=site.s2connect.deployment),
                                 s2_versions=list(S2_JSON_VERSIONS), connection_details=details)
        except S2ConnectError as exc:
            raise _fail(str(exc)) from exc
        rm = NodeDescription.model_validate(pairing.server_node)
        await book.save_pairing(rm, EndpointDescription.model_validate(pairing.server_endpoint),
                                token_hash(token), peer_url=pairing.pairing_url,
                                peer_ca=pairing.ca_pem)
        return f"{rm.brand} {rm.modelName} ({rm.id})"
    finally:
        await store.close()


def discover_command(timeout_s: float, json_out: bool) -> None:
    from cem.s2connect.discovery import discover

    try:
        found = asyncio.run(discover(timeout_s=timeout_s))
    except OSError as exc:
        raise _fail(f"DNS-SD is not available here: {exc}") from exc
    if json_out:
        print(json.dumps([f.__dict__ for f in found]))
        return
    if not found:
        console.print(f"no RM announced itself within {timeout_s:g} s")
        return
    table = Table("name", "pairing URL", "long-polling URL", "endpoint")
    for f in found:
        table.add_row(f.name, f.pairing_url or "-", f.longpolling_url or "-",
                      f.endpoint_name or "-")
    console.print(table)
