"""S2 protocol: sans-I/O session state machine and the thin websocket server."""
