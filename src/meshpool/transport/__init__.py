"""Sockets, framing and serialization. Knows nothing about tasks."""
