"""Errors the coordinator raises; the HTTP layer maps each to a status code."""

from __future__ import annotations


class NotFound(LookupError):
    """No such experiment, client, round or model (404)."""


class Conflict(Exception):
    """The request is valid but too late, a duplicate, or from a client not holding the slot (409)."""


class BadRequest(ValueError):
    """A malformed request; `field` names the offending input (400)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
