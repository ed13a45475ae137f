"""Executor, Future, as_completed, wait, and the client's I/O thread."""
