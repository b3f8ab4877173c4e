"""Our RM's pairing client against s2auth's reference pairing server (an independent peer).

s2auth implements the pairing steps (version index, requestPairing, requestConnectionDetails,
finalizePairing) as a CEM; its session initiation lives elsewhere than its own pairing
answer points to, so only pairing is exercised here. It runs as its own process on loopback
with a CA and leaf made like the CEM's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cem.s2connect.tls import ensure_tls
from sitekit import s2connect as s2c
from sitekit import s2connect_client as client

TOKEN = "Pq7Rs2Tu9Vw3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def s2auth_server(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    pytest.importorskip("s2auth.reference.server.main")
    tls = ensure_tls(tmp_path / "peer-tls", ("127.0.0.1", "localhost"), label="s2auth peer")
    port = free_port()
    cem_node = str(uuid.uuid4())
    env = {**os.environ, "PAIRING_NODE_ID": "PAIR1234", "SERVER_S2_NODE_ID": cem_node,
           "CEM_S2_NODE_ID": cem_node, "CEM_TYPE": "CEM", "CEM_MODEL_NAME": "reference",
           "CEM_BRAND": "s2auth", "CEM_DEPLOYMENT_TYPE": "LAN", "DEFAULT_PAIRING_TOKEN": TOKEN,
           "SUPPORTED_S2_VERSIONS": '["v1.0.0"]', "SSL_CERTFILE": str(tls.chain),
           "SSL_KEYFILE": str(tls.leaf_key)}
    code = (f"import uvicorn; uvicorn.run('s2auth.reference.server.main:app', host='127.0.0.1', "
            f"port={port}, ssl_certfile={str(tls.chain)!r}, ssl_keyfile={str(tls.leaf_key)!r}, "
            "log_level='warning')")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}/pairing/"
    try:
        for _ in range(200):
            try:
                if httpx.get(url, verify=False, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                pytest.fail(f"s2auth server ended: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield url, cem_node, tls.ca_pem
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def test_our_rm_pairs_with_s2auths_pairing_server(s2auth_server: tuple[str, str, str],
                                                        tmp_path: Path) -> None:
    url, cem_node, ca_pem = s2auth_server
    node = s2c.NodeDescription(id=uuid.uuid4(), brand="Acme", type="battery",
                               modelName="B1", role="RM")
    link = client.S2ConnectLink(tmp_path / "pairing.json", node, s2_versions=["v1.0.0"])
    pairing = await link.pair(url, TOKEN)
    assert pairing.server_node_id == cem_node and pairing.server_node["role"] == "CEM"
    assert pairing.ca_pem == ca_pem                      # the peer's root, pinned
    assert len(s2c.b64decode(pairing.access_tokens[0])) == 32
    assert pairing.initiate_session_url is not None
    assert pairing.initiate_session_url.startswith(url.rsplit("/pairing/", 1)[0])
    assert link.file.load() == pairing
