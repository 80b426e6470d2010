"""Errors the coordinator raises; the HTTP layer maps each to a status code and nothing else.

`Invalid(field, rule)` is the one error of bad input (`server/validation.py`
raises it, as do the rules that need the store's state): the answer names both.
"""

from __future__ import annotations


class NotFound(LookupError):
    """No such experiment, worker, round or model (404)."""


class Conflict(Exception):
    """The request is valid but too late, a duplicate, or from a worker not holding the member (409)."""


class Invalid(ValueError):
    """A request input breaks a rule; `field` names the input, `rule` what it must be (400)."""

    status = 400

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class Refused(Invalid):
    """A well-formed update whose values the round cannot use: non-finite, out of bounds or screened out (422).

    Unlike other bad input it is recorded (a `refused_updates` document) and its
    member goes to another worker.
    """

    status = 422


class TooLarge(Invalid):
    """A request input is over a documented size limit (413)."""

    status = 413


class Throttled(Invalid):
    """A request over a documented bound or rate (429); try again after `retry_after_s`."""

    status = 429

    def __init__(self, field: str, rule: str, retry_after_s: int) -> None:
        super().__init__(field, rule)
        self.retry_after_s = retry_after_s


class Forbidden(Invalid):
    """An authenticated request for something its credential may not do (403)."""

    status = 403
