"""The scheduler: a pure state machine (state.py) behind a thin zmq loop (server.py)."""
