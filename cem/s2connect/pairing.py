"""The pairing server's state machine for one CEM node, without I/O (``now`` is passed in).

`PairingCore` judges the four calls of a pairing attempt (requestPairing,
requestConnectionDetails / postConnectionDetails, finalizePairing) in the spec's order and
answers each with the spec's status and error body (`Reply`). An attempt lives 15 s from its
pairingAttemptId; any wrong or out-of-order call ends it (the same call twice is answered
twice the same); a wrong HMAC answer ends it with 403. Nothing is paired until
finalizePairing(success) arrives after good connection details: `finalize` then hands the
completed `Attempt` to the caller, who stores the pairing before answering 204. Attempts are
kept by a hash of their id, so no lookup compares the secret itself.

The I/O around it (cem/s2connect/service.py) supplies the valid pairing token, holds the
one-attempt-at-a-time lock and the 1 s delay per node.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sitekit.s2connect import (
    COMMUNICATION_PROTOCOLS,
    PAIRING_ATTEMPT_S,
    EndpointDescription,
    FinalizePairingRequest,
    NodeDescription,
    RequestConnectionDetailsRequest,
    RequestPairingRequest,
    b64,
    b64decode,
    challenge_response,
    new_access_token,
    new_challenge,
    same_bytes,
    select_algorithm,
    select_version,
    token_hash,
)


@dataclass
class Reply:
    """An HTTP answer: status and JSON body (None: no body)."""

    status: int
    body: Any = None


def pairing_error(kind: str, info: str, status: int = 400) -> Reply:
    return Reply(status, {"errorMessage": kind, "additionalInfo": info})


@dataclass
class PairingToken:
    """The pairing token the server holds for a node now, and where it came from."""

    token: str
    kind: str   # "dynamic", "static" or "entered" (typed in for a client-only RM)


@dataclass
class Attempt:
    """One pairing attempt, from requestPairing to finalizePairing."""

    client: NodeDescription
    client_endpoint: EndpointDescription
    token: PairingToken
    algorithm: str
    server_challenge: bytes
    issued_at: float
    s2_versions: list[str]
    state: str = "requested"        # requested -> details_sent -> done | failed
    access_token: str | None = None
    answered: dict[str, tuple[str, Reply]] = field(default_factory=dict)


class PairingCore:
    """requestPairing ... finalizePairing for a CEM endpoint that represents one CEM node."""

    def __init__(self, node: NodeDescription, endpoint: EndpointDescription, *,
                 fingerprint: bytes | None, domain: str | None, session_url: str,
                 s2_versions: tuple[str, ...]) -> None:
        self.node = node
        self.endpoint = endpoint
        self.deployment = endpoint.deployment or "LAN"
        self.fingerprint = fingerprint
        self.domain = domain
        self.session_url = session_url
        self.s2_versions = s2_versions
        self._attempts: dict[str, Attempt] = {}

    # --- the calls ------------------------------------------------------------------------------

    def request_pairing(self, raw: Any, token: PairingToken | None, now: float) -> Reply:
        """Step 1-3: check, answer the client's challenge, issue the attempt and our challenge."""
        self.expire(now)
        try:
            request = RequestPairingRequest.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            return pairing_error("ParsingError", _short(exc))
        if request.nodeId is not None and request.nodeIdAlias is not None:
            return pairing_error("ParsingError", "give nodeId or nodeIdAlias, not both")
        if request.nodeIdAlias is not None:
            return pairing_error("NodeNotFound", f"no node with alias {request.nodeIdAlias!r} "
                                 "here: this endpoint has one node and no aliases")
        if request.nodeId is not None and request.nodeId != self.node.id:
            return pairing_error("NodeNotFound", f"no node {request.nodeId} here")
        if request.clientNodeDescription.role == self.node.role:
            return pairing_error("InvalidCombinationOfRoles",
                                 f"this node is a {self.node.role}; it pairs with an RM")
        algorithm = select_algorithm(request.supportedHmacHashingAlgorithms)
        if algorithm is None:
            return pairing_error("IncompatibleHmacHashingAlgorithms", "this server uses SHA256")
        if not request.forcePairing:
            if not set(request.supportedCommunicationProtocols) & set(COMMUNICATION_PROTOCOLS):
                return pairing_error("IncompatibleCommunicationProtocols",
                                     "this CEM speaks WebSocket")
            if select_version(request.supportedS2MessageVersions, self.s2_versions) is None:
                return pairing_error("IncompatibleS2MessageVersions",
                                     f"this CEM speaks S2 JSON {', '.join(self.s2_versions)}")
        client_deployment = request.clientEndpointDescription.deployment or "LAN"
        if self.deployment == "LAN" and client_deployment == "WAN":
            return pairing_error("Other", "a WAN RM would serve the sessions; this CEM only "
                                 "serves them itself")
        if token is None:
            return pairing_error("NoValidPairingTokenOnPairingServer",
                                 "no valid pairing code: show one with `cem pair code`")
        client_challenge = b64decode(request.clientHmacChallenge)
        response = challenge_response(client_challenge, token.token, deployment=self.deployment,
                                      fingerprint=self.fingerprint, domain=self.domain,
                                      algorithm=algorithm)
        attempt_id = b64(secrets.token_bytes(24))
        attempt = Attempt(client=request.clientNodeDescription,
                          client_endpoint=request.clientEndpointDescription, token=token,
                          algorithm=algorithm, server_challenge=new_challenge(), issued_at=now,
                          s2_versions=list(request.supportedS2MessageVersions))
        self._attempts[token_hash(attempt_id)] = attempt
        return Reply(200, {
            "pairingAttemptId": attempt_id,
            "serverNodeDescription": self.node.to_json(),
            "serverEndpointDescription": self.endpoint.to_json(),
            "selectedHmacHashingAlgorithm": algorithm,
            "clientHmacChallengeResponse": b64(response),
            "serverHmacChallenge": b64(attempt.server_challenge),
        })

    def request_connection_details(self, attempt_id: str | None, raw: Any, now: float) -> Reply:
        """Steps 6A-8A: check the client's answer to our challenge, then an access token."""
        attempt, key = self._find(attempt_id, now)
        if attempt is None:
            return Reply(401)
        repeated = self._repeated(attempt, "requestConnectionDetails", raw)
        if repeated is not None:
            return repeated
        if attempt.state != "requested":
            return self._fail(key, "requestConnectionDetails out of order")
        try:
            request = RequestConnectionDetailsRequest.model_validate(raw)
            answer = b64decode(request.serverHmacChallengeResponse)
        except (ValidationError, ValueError) as exc:
            return self._fail(key, _short(exc))
        expected = challenge_response(attempt.server_challenge, attempt.token.token,
                                      deployment=self.deployment, fingerprint=self.fingerprint,
                                      domain=self.domain, algorithm=attempt.algorithm)
        if not same_bytes(expected, answer):
            self._attempts.pop(key, None)
            return Reply(403)
        attempt.access_token = new_access_token()
        attempt.state = "details_sent"
        reply = Reply(200, {"initiateSessionUrl": self.session_url,
                            "accessToken": attempt.access_token})
        attempt.answered["requestConnectionDetails"] = (_canonical(raw), reply)
        return reply

    def post_connection_details(self, attempt_id: str | None, raw: Any, now: float) -> Reply:
        """Step 6B: only when the client serves the sessions, which never happens here."""
        attempt, key = self._find(attempt_id, now)
        if attempt is None:
            return Reply(401)
        return self._fail(key, "this CEM serves the sessions: call requestConnectionDetails")

    def finalize(self, attempt_id: str | None, raw: Any, now: float) -> tuple[Reply, Attempt | None]:
        """Step 9-10: (204, the completed attempt to store) or the refusal."""
        attempt, key = self._find(attempt_id, now)
        if attempt is None:
            return Reply(401), None
        try:
            request = FinalizePairingRequest.model_validate(raw if raw is not None else {})
        except (ValidationError, ValueError) as exc:
            return self._fail(key, _short(exc)), None
        if not request.success:
            self._attempts.pop(key, None)
            return Reply(204), None
        if attempt.state == "done":
            return Reply(204), None
        if attempt.state != "details_sent":
            return self._fail(key, "finalizePairing before the connection details"), None
        attempt.state = "done"
        return Reply(204), attempt

    def forget(self, attempt: Attempt) -> None:
        """Drop a finished attempt (after its pairing was stored, or could not be)."""
        for key, value in list(self._attempts.items()):
            if value is attempt:
                del self._attempts[key]

    def expire(self, now: float) -> None:
        for key, attempt in list(self._attempts.items()):
            if now - attempt.issued_at > PAIRING_ATTEMPT_S:
                del self._attempts[key]

    @property
    def open_attempts(self) -> int:
        return len(self._attempts)

    # --- helpers ----------------------------------------------------------------------------------

    def _find(self, attempt_id: str | None, now: float) -> tuple[Attempt | None, str]:
        self.expire(now)
        if not attempt_id:
            return None, ""
        key = token_hash(attempt_id)
        return self._attempts.get(key), key

    def _fail(self, key: str, info: str) -> Reply:
        self._attempts.pop(key, None)
        return pairing_error("Other", info)

    @staticmethod
    def _repeated(attempt: Attempt, call: str, raw: Any) -> Reply | None:
        seen = attempt.answered.get(call)
        if seen is not None and seen[0] == _canonical(raw):
            return seen[1]
        return None


def _canonical(raw: Any) -> str:
    try:
        return json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):
        return repr(raw)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                 for e in exc.errors()[:3]]
        return "; ".join(parts)[:300]
    return str(exc)[:300]
