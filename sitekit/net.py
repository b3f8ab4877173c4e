"""Listening sockets bound ahead of serving.

A service binds its ports first and serves them later (websockets' and uvicorn's `sock=`), so a
port another program holds stops it before it opens or recovers any database.
"""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking TCP socket on host:port (OSError when the address is taken).

    Connections that arrive before the server serves the socket wait in the backlog.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
