"""The floor of `cem bench s2`: a websocket server that only answers, on the CEM's event loop.

It does what no S2 server can do without: accept the upgrade, cut and unmask frames, read a
message's type and id, and write an answer (ReceptionStatus OK; HandshakeResponse to a
Handshake; SelectControlType to ResourceManagerDetails), one write per read. No JSON parse,
no validation, no state, no store, no control loop. Run under the bench's same clients and
rate, its CPU per message is what the event loop and the sockets cost on this machine; what
`cem run` uses above it is the CEM's own work (`cem bench s2 --floor`).

Not a CEM: never point a resource manager at it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import uuid
from typing import cast

from websockets.frames import apply_mask

from cem.app.bench_s2 import json_field
from cem.app.service import event_loop_factory, raise_open_file_limit, run_on_event_loop

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OK = '{"message_type":"ReceptionStatus","subject_message_id":"%s","status":"OK"}'
_HANDSHAKE_RESPONSE = ('{"message_type":"HandshakeResponse","message_id":"%s",'
                       '"selected_protocol_version":"0.0.2-beta"}')
_SELECT = ('{"message_type":"SelectControlType","message_id":"%s",'
           '"control_type":"%s"}')


def _frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final frame (a server's)."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big") + payload


class FloorConnection(asyncio.Protocol):
    """One connection: the HTTP upgrade, then masked frames in, answers out."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            self._upgrade(buffer[:end])
            buffer = buffer[end + 4:]
        out: list[bytes] = []
        at, size = 0, len(buffer)
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length, head = second & 0x7F, at + 2
            if length == 126:
                if size - at < 4:
                    break
                length, head = int.from_bytes(buffer[at + 2:at + 4], "big"), at + 4
            elif length == 127:
                if size - at < 10:
                    break
                length, head = int.from_bytes(buffer[at + 2:at + 10], "big"), at + 10
            masked = second & 0x80
            end = head + (4 if masked else 0) + length
            if end > size:
                break
            payload = buffer[head + 4:end] if masked else buffer[head:end]
            if masked:
                payload = apply_mask(payload, buffer[head:head + 4])
            self._on_frame(first & 0x0F, payload, out)
            at = end
        self.buffer = buffer[at:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _upgrade(self, request: bytes) -> None:
        key = b""
        for line in request.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\n\r\n")
        self.upgraded = True

    def _on_frame(self, opcode: int, payload: bytes, out: list[bytes]) -> None:
        if opcode == 0x9:
            out.append(_frame(0xA, payload))
            return
        if opcode == 0x8:
            out.append(_frame(0x8, payload[:2]))
            if self.transport is not None:
                self.transport.write(b"".join(out))
                out.clear()
                self.transport.close()
            return
        if opcode != 0x1:
            return
        text = payload.decode()
        kind = json_field(text, "message_type")
        if kind == "ReceptionStatus":
            return
        message_id = json_field(text, "message_id")
        if message_id is None:
            return
        out.append(_frame(0x1, (_OK % message_id).encode()))
        if kind == "Handshake":
            out.append(_frame(0x1, (_HANDSHAKE_RESPONSE % uuid.uuid4()).encode()))
        elif kind == "ResourceManagerDetails":
            at = text.find('"available_control_types":["')
            control = text[at + 28:text.find('"', at + 28)] if at >= 0 else "NOT_CONTROLABLE"
            out.append(_frame(0x1, (_SELECT % (uuid.uuid4(), control)).encode()))


async def serve_floor(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(FloorConnection, host, port, backlog=4096)
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    raise_open_file_limit()
    run_on_event_loop(serve_floor(args.host, args.port), event_loop_factory())


if __name__ == "__main__":
    main()
