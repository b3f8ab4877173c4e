"""S2 Connect 1.0.0, the parts a CEM and a resource manager share.

- the JSON bodies of the pairing API and the session-initiation API (OpenAPI files of
  flexiblepower/s2-connect, v1.0), as pydantic models that ignore properties they do not know
  (a newer minor version may add some);
- the challenge-response function: ``R = HMAC(C, T || F)`` when the pairing *server* is
  deployed in the LAN (F: the 32-byte SHA-256 fingerprint of its TLS leaf certificate) and
  ``R = HMAC(C, T || D)`` in the WAN (D: its domain name), the pairing token T and D as ASCII
  bytes, C the challenge's bytes (decoded from Base64), SHA256 the only hash;
- pairing codes (``[node id alias-]token``), the fingerprints, the LAN subnet check and the
  reconnect back-off ``random(0, min(600, 2 * 2^n))`` seconds.

Nothing here does I/O except `same_subnet` (it reads the machine's interface addresses).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import random
import re
import secrets
import string
from collections.abc import Callable
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_VERSION = "v1"
"""The major version of the pairing and session-initiation APIs this code speaks."""
HMAC_ALGORITHMS = ("SHA256",)
COMMUNICATION_PROTOCOLS = ("WebSocket",)
PAIRING_ATTEMPT_S = 15.0
"""A pairing attempt must be completed this long after its pairingAttemptId was issued."""
PENDING_TOKEN_S = 15.0
"""A pending access token must be confirmed this long after initiateSession issued it."""
WEBSOCKET_TOKEN_S = 30.0
"""A websocket token is good for one connection within this long."""
REQUEST_PAIRING_DELAY_S = 1.0
"""The mandatory delay before a requestPairing response (brute-force protection)."""
DYNAMIC_CODE_LENGTH = 10
"""Dynamic pairing tokens are at least this long: one answered requestPairing lets an attacker
test guesses offline against the server's HMAC, so 4 characters (the spec's minimum) fall
at once; 62^10 guesses do not."""
STATIC_CODE_LENGTH = 16
DYNAMIC_CODE_LIFETIME_S = 300.0

PAIRING_CODE = re.compile(r"^(?:([0-9a-zA-Z]+)-)?([0-9a-zA-Z]{4,})$")
_ALPHABET = string.ascii_letters + string.digits

Role = Literal["CEM", "RM"]
Deployment = Literal["LAN", "WAN"]


# --- the API's bodies -------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Every API body: unknown properties are ignored (minor versions may add some)."""

    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _b64(value: str, *, min_bytes: int = 0, what: str = "value") -> bytes:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ValueError(f"{what} is not Base64") from exc
    if len(raw) < min_bytes:
        raise ValueError(f"{what} must be at least {min_bytes} bytes")
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode(value: str) -> bytes:
    """Base64 text to bytes; ValueError when it is not Base64."""
    return _b64(value)


class NodeDescription(ApiModel):
    id: UUID
    brand: str
    logoUrl: str | None = None
    type: str
    modelName: str
    userDefinedName: str | None = None
    role: Role


class EndpointDescription(ApiModel):
    name: str | None = None
    logoUrl: str | None = None
    deployment: Deployment | None = None


class RequestPairingRequest(ApiModel):
    clientNodeDescription: NodeDescription
    clientEndpointDescription: EndpointDescription
    nodeId: UUID | None = None
    nodeIdAlias: str | None = Field(None, pattern=r"^[0-9a-zA-Z]+$")
    supportedCommunicationProtocols: list[str]
    supportedS2MessageVersions: list[str]
    supportedHmacHashingAlgorithms: list[str]
    clientHmacChallenge: str
    forcePairing: bool = False

    @field_validator("clientHmacChallenge")
    @classmethod
    def _challenge(cls, value: str) -> str:
        _b64(value, min_bytes=32, what="clientHmacChallenge")
        return value


class RequestPairingResponse(ApiModel):
    pairingAttemptId: str = Field(min_length=32)
    serverNodeDescription: NodeDescription
    serverEndpointDescription: EndpointDescription
    selectedHmacHashingAlgorithm: str
    clientHmacChallengeResponse: str
    serverHmacChallenge: str


class ConnectionDetails(ApiModel):
    initiateSessionUrl: str
    accessToken: str
    certificateFingerprint: dict[str, str] | None = None


class RequestConnectionDetailsRequest(ApiModel):
    serverHmacChallengeResponse: str


class PostConnectionDetailsRequest(ApiModel):
    serverHmacChallengeResponse: str
    connectionDetails: ConnectionDetails


class FinalizePairingRequest(ApiModel):
    success: bool | None = None


class PairingError(ApiModel):
    errorMessage: Literal[
        "InvalidCombinationOfRoles", "IncompatibleS2MessageVersions",
        "IncompatibleHmacHashingAlgorithms", "IncompatibleCommunicationProtocols",
        "NodeNotFound", "NoNodeIdProvided", "NoValidPairingTokenOnPairingServer",
        "ParsingError", "Other"]
    additionalInfo: str | None = None


class PreparePairingRequest(ApiModel):
    clientNodeDescription: NodeDescription
    clientEndpointDescription: EndpointDescription
    serverNodeId: UUID


class CancelPreparePairingRequest(ApiModel):
    clientNodeId: UUID
    serverNodeId: UUID


class WaitForPairingItem(ApiModel):
    clientNodeId: UUID
    clientNodeDescription: NodeDescription | None = None
    clientEndpointDescription: EndpointDescription | None = None
    errorMessage: Literal["NoValidTokenOnPairingClient"] | None = None


class WaitForPairingAction(ApiModel):
    clientNodeId: UUID
    action: Literal["sendNodeDescription", "preparePairing", "cancelPreparePairing",
                    "requestPairing"]


class InitiateSessionRequest(ApiModel):
    clientNodeId: UUID
    serverNodeId: UUID
    supportedS2MessageVersions: list[str]
    supportedCommunicationProtocols: list[str]
    clientNodeDescription: NodeDescription | None = None
    clientEndpointDescription: EndpointDescription | None = None


class InitiateSessionResponse(ApiModel):
    selectedCommunicationProtocol: str
    selectedS2MessageVersion: str
    accessToken: str
    serverNodeDescription: NodeDescription | None = None
    serverEndpointDescription: EndpointDescription | None = None


class WebSocketCommunicationDetails(ApiModel):
    communicationProtocol: Literal["WebSocket"] = "WebSocket"
    websocketToken: str
    websocketUrl: str


class CommunicationDetailsError(ApiModel):
    errorMessage: Literal["IncompatibleS2MessageVersions", "IncompatibleCommunicationProtocols",
                          "NoLongerPaired", "ParsingError", "Other"]
    additionalInfo: str | None = None


class UnpairRequest(ApiModel):
    clientNodeId: UUID
    serverNodeId: UUID


# --- challenge and response --------------------------------------------------------------------


def new_challenge(size: int = 32) -> bytes:
    """A fresh challenge (CSPRNG, at least 32 bytes)."""
    if size < 32:
        raise ValueError("a challenge has at least 32 bytes")
    return secrets.token_bytes(size)


def challenge_response(challenge: bytes, pairing_token: str, *, deployment: Deployment,
                       fingerprint: bytes | None = None, domain: str | None = None,
                       algorithm: str = "SHA256") -> bytes:
    """``HMAC(C, T || F)`` (LAN pairing server) or ``HMAC(C, T || D)`` (WAN pairing server).

    `deployment` is the pairing *server's*; `fingerprint` the SHA-256 of its TLS leaf
    certificate (32 bytes, LAN); `domain` its domain name without scheme or slashes (WAN).
    """
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"unsupported HMAC hashing algorithm {algorithm!r}")
    token = pairing_token.encode("ascii")
    if deployment == "LAN":
        if fingerprint is None or len(fingerprint) != 32:
            raise ValueError("a LAN response needs the 32-byte SHA-256 leaf fingerprint")
        message = token + fingerprint
    else:
        if not domain:
            raise ValueError("a WAN response needs the server's domain name")
        message = token + domain.encode("ascii")
    return hmac.new(challenge, message, hashlib.sha256).digest()


def same_bytes(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a, b)


def select_algorithm(offered: list[str]) -> str | None:
    return next((a for a in HMAC_ALGORITHMS if a in offered), None)


# --- pairing codes -----------------------------------------------------------------------------


def new_pairing_token(length: int = DYNAMIC_CODE_LENGTH) -> str:
    """A pairing token of letters and digits from the CSPRNG."""
    if length < 4:
        raise ValueError("a pairing token has at least 4 characters")
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def parse_pairing_code(code: str) -> tuple[str | None, str]:
    """``alias-token`` or ``token`` -> (alias or None, token); ValueError if malformed."""
    match = PAIRING_CODE.match(code.strip())
    if match is None:
        raise ValueError("a pairing code is letters and digits (at least 4), optionally "
                         "preceded by a node alias and a dash, e.g. A1-x7Kq2mPz9R")
    return match.group(1), match.group(2)


# --- tokens and certificates ---------------------------------------------------------------------


def new_access_token() -> str:
    """An access or websocket token: 32 CSPRNG bytes, Base64."""
    return b64(secrets.token_bytes(32))


def token_hash(token: str) -> str:
    """What the store keeps of a token (SHA-256 hex of its text): the token is 256 random
    bits, so a fast hash is enough and a lookup by hash leaks nothing useful."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def sha256_fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def fingerprint_hex(der_or_digest: bytes) -> str:
    """Colon-separated upper-case hex of a certificate's SHA-256 (given DER or the digest)."""
    digest = der_or_digest if len(der_or_digest) == 32 else sha256_fingerprint(der_or_digest)
    return ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint(text: str) -> bytes:
    """Hex (with or without colons) -> 32 bytes; ValueError otherwise."""
    raw = bytes.fromhex(text.replace(":", "").strip())
    if len(raw) != 32:
        raise ValueError("a SHA-256 fingerprint has 32 bytes")
    return raw


# --- versions, back-off, subnet ----------------------------------------------------------------


def version_key(version: str) -> str:
    """``v1.0.0`` and ``1.0.0`` name the same S2 JSON version."""
    return version.strip().lower().removeprefix("v")


def select_version(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The first of `supported` (our preference) that the peer offered, in the peer's spelling."""
    by_key = {version_key(v): v for v in offered}
    for mine in supported:
        if version_key(mine) in by_key:
            return by_key[version_key(mine)]
    return None


def reconnect_delay(attempt: int, *, base_s: float = 2.0, max_s: float = 600.0,
                    rand: Callable[[], float] = random.random) -> float:
    """The spec's back-off: a uniform draw in [0, min(max, base * 2^n)] for attempt n (0, 1, ...)."""
    ceiling = min(max_s, base_s * (2 ** min(max(attempt, 0), 30)))
    return rand() * ceiling


def same_subnet(peer: str) -> bool:
    """Whether `peer` (an IP address) is on one of this machine's subnets (or loopback)."""
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if address.is_loopback:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
        if address.is_loopback:
            return True
    try:
        import ifaddr
    except ImportError:  # pragma: no cover - ifaddr comes with zeroconf
        return False
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            host = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                network = ipaddress.ip_network(f"{host.split('%')[0]}/{ip.network_prefix}",
                                               strict=False)
            except ValueError:
                continue
            if address.version == network.version and address in network:
                return True
    return False
