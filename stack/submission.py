"""What a submit answers: the experiment ids in the submitted order, and which of them were resumed.

The server builds it (`Coordinator.submit`), the HTTP answer carries it as
``{"ids": [...], "resumed": [...]}`` and the transport reads it back
(`Transport.submit_experiments`).
"""

from __future__ import annotations

from collections.abc import Iterable


class Submitted(list[str]):
    """The ids of the submitted specs, in order (a list: ``(experiment_id,) = submitted`` unpacks it).

    `resumed`: the ids among them that were queued or running before this submit
    (an identical spec, `fedland.spec.fingerprint`, resumed instead of queued again).
    """

    def __init__(self, ids: Iterable[str] = (), resumed: Iterable[str] = ()) -> None:
        super().__init__(ids)
        self.resumed: tuple[str, ...] = tuple(dict.fromkeys(resumed))
        unknown = set(self.resumed) - set(self)
        if unknown:
            raise ValueError(f"resumed: {sorted(unknown)[0]!r} is not among the submitted ids")

    def answer(self) -> dict[str, list[str]]:
        """The JSON answer of ``POST /experiments``."""
        return {"ids": list(self), "resumed": list(self.resumed)}
