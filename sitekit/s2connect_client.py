"""The HTTPS client side of S2 Connect 1.0.0: pairing with a code, session initiation, unpairing.

Used by our resource managers (pairing client and communication client of a CEM) and by the
CEM's `cem pair rm` (pairing client of an RM that shows a code). Over httpx, HTTP/1.1 + TLS.

Trust, as the spec has it: before pairing, a LAN server's self-signed certificate is accepted,
and its leaf's SHA-256 fingerprint goes into the HMAC; when the server's answer to our
challenge is right, that leaf is the one the user's code vouches for, and the CA (root) it
came with is pinned: every later call (session initiation, unpairing, the websocket) checks the
server's chain against that CA and nothing else. A WAN server is checked against the system's
CAs.

Access tokens rotate on every session: `open_session` keeps the tokens it may still need in
the pairing record (saved before each step that could lose one) and tries them newest first,
so a lost confirmAccessToken response costs one 401, not the pairing. Tokens are never logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from sitekit.s2connect import (
    API_VERSION,
    COMMUNICATION_PROTOCOLS,
    HMAC_ALGORITHMS,
    ConnectionDetails,
    Deployment,
    EndpointDescription,
    InitiateSessionResponse,
    NodeDescription,
    RequestPairingResponse,
    WebSocketCommunicationDetails,
    b64,
    b64decode,
    challenge_response,
    fingerprint_hex,
    new_challenge,
    parse_pairing_code,
    same_bytes,
    sha256_fingerprint,
)

logger = logging.getLogger("sitekit.s2connect")

TIMEOUT_S = 20.0


class S2ConnectError(Exception):
    """A pairing or session call did not succeed; the message says why in plain words."""

    def __init__(self, message: str, *, status: int | None = None,
                 error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class NoLongerPaired(S2ConnectError):
    """The server unpaired us: do not retry, tell the user."""


class NotPaired(S2ConnectError):
    """The server accepts none of our access tokens: do not retry, tell the user."""


# --- TLS ---------------------------------------------------------------------------------------


def unverified_context() -> ssl.SSLContext:
    """Before pairing: accept a self-signed certificate (trust comes from the HMAC)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pinned_context(ca_pem: str | None) -> ssl.SSLContext:
    """After pairing: the pinned CA only (or the system's CAs for a WAN server)."""
    if ca_pem is None:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_chain(response: httpx.Response) -> list[bytes]:
    """The certificates (DER, leaf first) the server presented on this response's connection."""
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return []
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13+
    if callable(public):
        return [bytes(c) for c in public()]  # DER bytes
    inner = getattr(ssl_object, "_sslobj", None)
    chain = getattr(inner, "get_unverified_chain", None)
    if callable(chain):
        import _ssl
        return [c.public_bytes(_ssl.ENCODING_DER) for c in chain() or []]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _is_self_signed_ca(der: bytes) -> bool:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    if cert.issuer != cert.subject:
        return False
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.ca)


# --- the pairing record -------------------------------------------------------------------------


@dataclass
class Pairing:
    """What a pairing client keeps about one pairing (the RM side's JSON file)."""

    client_node_id: str
    server_node: dict[str, Any]
    server_endpoint: dict[str, Any]
    pairing_url: str
    role: str                                  # our role: RM or CEM
    initiate_session_url: str | None = None    # when we are the communication client
    access_tokens: list[str] = field(default_factory=list)   # oldest first, newest last
    ca_pem: str | None = None                  # the pinned CA (None: WAN, system CAs)
    s2_versions: list[str] = field(default_factory=list)
    selected_s2_version: str | None = None

    @property
    def server_node_id(self) -> str:
        return str(self.server_node["id"])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pairing:
        return cls(**data)


class PairingFile:
    """A pairing record in a JSON file (0600), written atomically (temp file, fsync, rename)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> Pairing | None:
        try:
            return Pairing.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise S2ConnectError(f"{self.path} is not a pairing record: {exc}") from exc

    def save(self, pairing: Pairing) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pairing-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(pairing.to_json(), out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- helpers -------------------------------------------------------------------------------------


def base_url(url: str) -> str:
    """An API base URL with its trailing slash (the spec's pairing URL form)."""
    if not url.startswith("https://"):
        raise S2ConnectError(f"{url}: S2 Connect needs an https:// URL")
    return url if url.endswith("/") else url + "/"


def _guess_deployment(url: str) -> Deployment:
    import ipaddress

    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".local"):
        return "LAN"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "WAN"
    return "LAN" if (address.is_private or address.is_loopback or address.is_link_local) else "WAN"


def communication_server_role(cem_deployment: Deployment, rm_deployment: Deployment) -> str:
    """Which role serves the session: the WAN node when one is WAN and one LAN, else the CEM."""
    if cem_deployment != rm_deployment:
        return "CEM" if cem_deployment == "WAN" else "RM"
    return "CEM"


def _error_of(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("errorMessage"), str):
            return str(body["errorMessage"])
    return None


async def select_api_version(client: httpx.AsyncClient, url: str) -> str:
    """GET the unversioned index and choose v1 (the only major version we speak)."""
    response = await client.get(url)
    if response.status_code != 200:
        raise S2ConnectError(f"{url} answered HTTP {response.status_code} to the version index",
                             status=response.status_code)
    try:
        versions = response.json()
    except ValueError as exc:
        raise S2ConnectError(f"{url} did not answer the version index with JSON") from exc
    if not isinstance(versions, list) or API_VERSION not in versions:
        raise S2ConnectError(f"{url} speaks {versions}, we speak [{API_VERSION!r}]")
    return API_VERSION


# --- pairing as the HTTPS client --------------------------------------------------------------------


ConnectionDetailsFor = Callable[[NodeDescription, EndpointDescription], ConnectionDetails]


async def pair(pairing_url: str, code: str, *, node: NodeDescription,
               endpoint: EndpointDescription, s2_versions: list[str],
               connection_details: ConnectionDetailsFor | None = None,
               timeout_s: float = TIMEOUT_S) -> Pairing:
    """Pair our `node` with the node behind `pairing_url` using the code its user shows.

    When we will be the communication server (a CEM pairing a LAN RM), `connection_details`
    gives what we post to the server (our session URL, a fresh access token, our CA
    fingerprint). Raises S2ConnectError with the reason; a pairing that fails leaves nothing.
    """
    alias, token = parse_pairing_code(code)
    base = base_url(pairing_url)
    async with httpx.AsyncClient(verify=unverified_context(), timeout=timeout_s,
                                 http2=False) as client:
        try:
            version = await select_api_version(client, base)
            api = urljoin(base, version + "/")
            challenge = new_challenge()
            request = {
                "clientNodeDescription": node.to_json(),
                "clientEndpointDescription": endpoint.to_json(),
                "supportedCommunicationProtocols": list(COMMUNICATION_PROTOCOLS),
                "supportedS2MessageVersions": list(s2_versions),
                "supportedHmacHashingAlgorithms": list(HMAC_ALGORITHMS),
                "clientHmacChallenge": b64(challenge),
                "forcePairing": False,
            }
            if alias is not None:
                request["nodeIdAlias"] = alias
            response = await client.post(api + "requestPairing", json=request)
        except httpx.HTTPError as exc:
            raise S2ConnectError(f"cannot reach {base}: {exc}") from exc
        chain = peer_chain(response)
        if response.status_code != 200:
            error = _error_of(response)
            raise S2ConnectError(
                f"{base} refused to pair (HTTP {response.status_code}"
                f"{': ' + error if error else ''})", status=response.status_code, error=error)
        try:
            answer = RequestPairingResponse.model_validate(response.json())
        except ValueError as exc:
            raise S2ConnectError(f"{base} answered requestPairing with a body we cannot "
                                 "read") from exc
        attempt = {"Authorization": f"Bearer {answer.pairingAttemptId}"}

        async def give_up(reason: str) -> S2ConnectError:
            with contextlib.suppress(httpx.HTTPError):
                await client.post(api + "finalizePairing", json={"success": False},
                                  headers=attempt)
            return S2ConnectError(reason)

        server_node, server_endpoint = answer.serverNodeDescription, answer.serverEndpointDescription
        deployment: Deployment = server_endpoint.deployment or _guess_deployment(base)
        host = urlsplit(base).hostname or ""
        if deployment == "LAN" and not chain:
            raise await give_up("cannot read the server's TLS certificate")
        leaf_fp = sha256_fingerprint(chain[0]) if chain else None
        try:
            expected = challenge_response(challenge, token, deployment=deployment,
                                          fingerprint=leaf_fp, domain=host,
                                          algorithm=answer.selectedHmacHashingAlgorithm)
            theirs = b64decode(answer.clientHmacChallengeResponse)
            server_challenge = b64decode(answer.serverHmacChallenge)
        except ValueError as exc:
            raise await give_up(f"{base}: {exc}") from exc
        if not same_bytes(expected, theirs):
            raise await give_up("the server's answer to our challenge is wrong: the pairing "
                                "code does not match (or someone is in between)")
        if server_node.role == node.role:
            raise await give_up(f"the node at {base} is a {server_node.role} too; a CEM pairs "
                                "with an RM")
        ours = b64(challenge_response(server_challenge, token, deployment=deployment,
                                      fingerprint=leaf_fp, domain=host,
                                      algorithm=answer.selectedHmacHashingAlgorithm))
        ca_pem = None
        if deployment == "LAN":
            root = chain[-1] if len(chain) > 1 and _is_self_signed_ca(chain[-1]) else chain[0]
            ca_pem = ssl.DER_cert_to_PEM_cert(root)
        pairing = Pairing(client_node_id=str(node.id), server_node=server_node.to_json(),
                          server_endpoint=server_endpoint.to_json(), pairing_url=base,
                          role=node.role, ca_pem=ca_pem, s2_versions=list(s2_versions))
        cem_deployment = endpoint.deployment if node.role == "CEM" else deployment
        rm_deployment = deployment if node.role == "CEM" else endpoint.deployment
        we_serve = communication_server_role(cem_deployment or "LAN",
                                             rm_deployment or "LAN") == node.role

        def same_server(reply: httpx.Response) -> bool:
            now = peer_chain(reply)
            return not now or leaf_fp is None or same_bytes(sha256_fingerprint(now[0]), leaf_fp)

        try:
            if we_serve:
                if connection_details is None:
                    raise await give_up("we would serve the sessions, but have no session API")
                details = connection_details(server_node, server_endpoint)
                reply = await client.post(api + "postConnectionDetails", headers=attempt, json={
                    "serverHmacChallengeResponse": ours,
                    "connectionDetails": details.to_json()})
                if reply.status_code != 204:
                    raise S2ConnectError(_refusal("postConnectionDetails", reply),
                                         status=reply.status_code)
                pairing.access_tokens = [details.accessToken]
            else:
                reply = await client.post(api + "requestConnectionDetails", headers=attempt,
                                          json={"serverHmacChallengeResponse": ours})
                if reply.status_code != 200:
                    raise S2ConnectError(_refusal("requestConnectionDetails", reply),
                                         status=reply.status_code)
                try:
                    got = ConnectionDetails.model_validate(reply.json())
                except ValueError as exc:
                    raise await give_up("unreadable connection details") from exc
                pairing.initiate_session_url = base_url(got.initiateSessionUrl)
                pairing.access_tokens = [got.accessToken]
            if not same_server(reply):
                raise await give_up("the server's certificate changed during pairing")
            final = await client.post(api + "finalizePairing", headers=attempt,
                                      json={"success": True})
        except httpx.HTTPError as exc:
            raise S2ConnectError(f"pairing with {base} broke off: {exc}") from exc
        if final.status_code != 204:
            raise S2ConnectError(_refusal("finalizePairing", final), status=final.status_code)
        logger.info("paired with %s %s (%s) at %s", server_node.role, server_node.id,
                    server_node.brand, base)
        return pairing


def _refusal(step: str, reply: httpx.Response) -> str:
    if reply.status_code == 403:
        return f"{step}: the server did not accept our answer (the pairing code is wrong)"
    if reply.status_code == 401:
        return f"{step}: the pairing attempt expired or is unknown (15 s); try again"
    error = _error_of(reply)
    return f"{step}: HTTP {reply.status_code}{' ' + error if error else ''}"


# --- session initiation as the communication client -------------------------------------------------


@dataclass
class SessionTicket:
    """Where and how to open one S2 websocket session."""

    websocket_url: str
    websocket_token: str
    s2_version: str
    ssl_context: ssl.SSLContext


async def open_session(pairing: Pairing, save: Callable[[Pairing], None], *,
                       client_node: NodeDescription | None = None,
                       timeout_s: float = TIMEOUT_S) -> SessionTicket:
    """initiateSession + confirmAccessToken: a websocket ticket, the access token rotated.

    `save` persists the record (it is called before the pending token is confirmed, and after);
    if it raises, the session is not opened. Raises NoLongerPaired, NotPaired (stop), or
    S2ConnectError (try again later).
    """
    if pairing.initiate_session_url is None:
        raise S2ConnectError("this pairing has no session URL: the other node serves sessions")
    if not pairing.access_tokens:
        raise NotPaired("no access token left for this pairing")
    context = pinned_context(pairing.ca_pem)
    base = base_url(pairing.initiate_session_url)
    async with httpx.AsyncClient(verify=context, timeout=timeout_s) as client:
        try:
            api = urljoin(base, await select_api_version(client, base) + "/")
            body: dict[str, Any] = {
                "clientNodeId": pairing.client_node_id,
                "serverNodeId": pairing.server_node_id,
                "supportedS2MessageVersions": list(pairing.s2_versions),
                "supportedCommunicationProtocols": list(COMMUNICATION_PROTOCOLS),
            }
            if client_node is not None:
                body["clientNodeDescription"] = client_node.to_json()
            accepted: str | None = None
            answer: InitiateSessionResponse | None = None
            for token in reversed(list(pairing.access_tokens)):
                reply = await client.post(api + "initiateSession", json=body,
                                          headers={"Authorization": f"Bearer {token}"})
                if reply.status_code == 401:
                    continue
                if reply.status_code == 400:
                    error = _error_of(reply)
                    if error == "NoLongerPaired":
                        raise NoLongerPaired("the CEM unpaired this device", status=400,
                                             error=error)
                    raise S2ConnectError(f"initiateSession refused: {error or 'HTTP 400'}",
                                         status=400, error=error)
                if reply.status_code != 200:
                    raise S2ConnectError(f"initiateSession: HTTP {reply.status_code}",
                                         status=reply.status_code)
                try:
                    answer = InitiateSessionResponse.model_validate(reply.json())
                except ValueError as exc:
                    raise S2ConnectError("initiateSession answered a body we cannot read") from exc
                accepted = token
                break
            if answer is None or accepted is None:
                raise NotPaired("the server accepts none of our access tokens", status=401)
            if answer.selectedS2MessageVersion not in pairing.s2_versions:
                raise S2ConnectError(f"the server chose S2 JSON {answer.selectedS2MessageVersion}"
                                     ", which we did not offer")
            if answer.selectedCommunicationProtocol not in COMMUNICATION_PROTOCOLS:
                raise S2ConnectError("the server chose a protocol we did not offer")
            pending = answer.accessToken
            pairing.access_tokens = [accepted, pending]
            save(pairing)
            reply = await client.post(api + "confirmAccessToken",
                                      headers={"Authorization": f"Bearer {pending}"})
            if reply.status_code == 401:
                pairing.access_tokens = [accepted]
                save(pairing)
                raise S2ConnectError("confirmAccessToken refused the pending token (too late?);"
                                     " retrying later", status=401)
            if reply.status_code != 200:
                raise S2ConnectError(f"confirmAccessToken: HTTP {reply.status_code}",
                                     status=reply.status_code)
            pairing.access_tokens = [pending]
            pairing.selected_s2_version = answer.selectedS2MessageVersion
            save(pairing)
            try:
                details = WebSocketCommunicationDetails.model_validate(reply.json())
            except ValueError as exc:
                raise S2ConnectError("confirmAccessToken answered a body we cannot read") from exc
        except httpx.HTTPError as exc:
            raise S2ConnectError(f"session initiation at {base} failed: {exc}") from exc
    if not details.websocketUrl.startswith("wss://"):
        raise S2ConnectError(f"the server offered {details.websocketUrl}; S2 is only sent "
                             "over wss://")
    return SessionTicket(details.websocketUrl, details.websocketToken,
                         answer.selectedS2MessageVersion, context)


async def unpair(pairing: Pairing, *, timeout_s: float = TIMEOUT_S) -> None:
    """Tell the communication server we unpair (with our access token); raises on failure."""
    if pairing.initiate_session_url is None:
        raise S2ConnectError("this pairing has no session URL to unpair at")
    base = base_url(pairing.initiate_session_url)
    async with httpx.AsyncClient(verify=pinned_context(pairing.ca_pem), timeout=timeout_s) as c:
        try:
            api = urljoin(base, await select_api_version(c, base) + "/")
            for token in reversed(list(pairing.access_tokens)):
                reply = await c.post(api + "unpair", headers={"Authorization": f"Bearer {token}"},
                                     json={"clientNodeId": pairing.client_node_id,
                                           "serverNodeId": pairing.server_node_id})
                if reply.status_code == 204:
                    return
                if reply.status_code != 401:
                    raise S2ConnectError(f"unpair: HTTP {reply.status_code}",
                                         status=reply.status_code)
        except httpx.HTTPError as exc:
            raise S2ConnectError(f"unpair at {base} failed: {exc}") from exc
    raise NotPaired("the server accepts none of our access tokens (already unpaired?)")


__all__ = [
    "NoLongerPaired", "NotPaired", "Pairing", "PairingFile", "S2ConnectError", "SessionTicket",
    "base_url", "communication_server_role", "fingerprint_hex", "open_session", "pair",
    "peer_chain", "pinned_context", "unpair", "unverified_context",
]


# --- one RM's pairing, for resource_managers/base.py -----------------------------------------------


class S2ConnectLink:
    """An RM node's S2 Connect pairing with one CEM, kept in a JSON file.

    `pair(url, code)` pairs and saves the record; `open_session()` rotates the access token
    and returns a websocket ticket; `unpair()` tells the CEM and forgets the record.
    """

    def __init__(self, state_file: Path | str, node: NodeDescription, *,
                 endpoint_name: str | None = None, s2_versions: list[str] | None = None) -> None:
        self.file = PairingFile(state_file)
        self.node = node
        self.endpoint = EndpointDescription(name=endpoint_name or node.brand, deployment="LAN")
        self.s2_versions = s2_versions or ["v1.0.0", "v0.0.2-beta"]

    @property
    def paired(self) -> bool:
        return self.file.load() is not None

    async def pair(self, pairing_url: str, code: str) -> Pairing:
        pairing = await pair(pairing_url, code, node=self.node, endpoint=self.endpoint,
                             s2_versions=self.s2_versions)
        self.file.save(pairing)
        return pairing

    async def open_session(self) -> SessionTicket:
        pairing = self.file.load()
        if pairing is None:
            raise NotPaired(f"not paired: no pairing record at {self.file.path}")
        try:
            return await open_session(pairing, self.file.save, client_node=self.node)
        except NoLongerPaired:
            self.file.delete()
            raise

    async def unpair(self) -> None:
        pairing = self.file.load()
        if pairing is None:
            return
        try:
            await unpair(pairing)
        finally:
            self.file.delete()
