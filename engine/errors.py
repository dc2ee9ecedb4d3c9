"""Errors the engine raises for a bad request; the gateway maps them to HTTP 4xx."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine will not run. `param` names the offending field, `code` is a
    machine-readable reason (OpenAI's error codes where one exists)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
