"""The spec's ``client_algorithm`` section, and the rules that pair a client algorithm with its strategy.

``client_algorithm`` names how members train locally: a built-in of
``fedland.algorithms.CLIENT_ALGORITHMS`` (``SGD``, ``SCAFFOLD``, ``FedDyn``,
``FedSAM``, ``FedASAM``) or an import path ``"package.module:Class"``, with the
algorithm's parameters beside its name::

    {"name": "FedSAM", "rho": 0.05}

The default, ``SGD`` without parameters, is the local SGD every experiment had
before (with FedProx's ``mu`` when the strategy is FedProx) and is left out of
stored documents, so older documents read back unchanged. Both the name and the
parameters are checked when the spec is built: the class is resolved
(``fedland.components.resolve``) and built with the parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedland.algorithms import SGD, ClientAlgorithm
from fedland.components import resolve_client_algorithm

__all__ = ["DEFAULT_CLIENT_ALGORITHM", "ClientAlgorithmSpec", "check_pairing"]

DEFAULT_CLIENT_ALGORITHM = "SGD"
#: Strategies whose server half needs the client algorithm of the same name (and, for FedDyn, the same alpha).
PAIRED = {"SCAFFOLD": "SCAFFOLD", "FedDyn": "FedDyn"}


def _spec_error(field_name: str, rule: str) -> ValueError:
    from fedland.spec import SpecError  # fedland.spec imports this module

    return SpecError(field_name, rule)


@dataclass(frozen=True)
class ClientAlgorithmSpec:
    """A client training algorithm by name (built-in or import path) and its parameters."""

    name: str = DEFAULT_CLIENT_ALGORITHM
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping) or any(not isinstance(key, str) for key in self.params):
            raise _spec_error("client_algorithm", f"parameters must be an object with string keys, got {self.params!r}")
        try:
            object.__setattr__(self, "params", json.loads(json.dumps(dict(self.params), allow_nan=False)))
        except (TypeError, ValueError) as error:
            raise _spec_error("client_algorithm", f"parameters must be JSON-able finite values ({error})") from None
        self.build()  # resolves the name and checks the parameters

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_CLIENT_ALGORITHM and not self.params

    def build(self, prox_mu: float = 0.0) -> ClientAlgorithm:
        """The algorithm object; plain ``SGD`` takes FedProx's ``prox_mu`` unless its own is given.

        Raises:
            SpecError: ``client_algorithm.name`` (unknown, not importable, contract not met) or
                ``client_algorithm.<param>`` (a parameter refused by the class).
        """
        try:
            factory = resolve_client_algorithm(self.name, "client_algorithm.name")
        except ValueError as error:
            field_name, _, rule = str(error).partition(": ")
            raise _spec_error(field_name, rule) from None
        params = dict(self.params)
        if factory is SGD and "prox_mu" not in params and prox_mu:
            params["prox_mu"] = prox_mu
        try:
            algorithm: ClientAlgorithm = factory(**params)
        except TypeError as error:
            raise _spec_error("client_algorithm", f"parameters {sorted(params)} refused by {self.name}: {error}") from None
        except ValueError as error:
            param, _, rule = str(error).partition(": ")
            where = f"client_algorithm.{param}" if param in params else "client_algorithm"
            raise _spec_error(where, rule if param in params else str(error)) from None
        return algorithm

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <param>: <value>, ...}`` (the parameters beside the name)."""
        return {"name": self.name, **json.loads(json.dumps(self.params))}

    @classmethod
    def from_dict(cls, data: Any) -> ClientAlgorithmSpec:
        """From ``"FedSAM"`` or ``{"name": "FedSAM", "rho": 0.05}``."""
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise _spec_error("client_algorithm", f"must be a name or an object with 'name', got {data!r}")
        if "name" not in data or not isinstance(data["name"], str):
            raise _spec_error("client_algorithm.name", f"missing or not a string in {dict(data)!r}")
        return cls(name=data["name"], params={key: value for key, value in data.items() if key != "name"})


def check_pairing(strategy_name: str, strategy_params: Mapping[str, Any], algorithm: ClientAlgorithmSpec) -> None:
    """Refuse a server strategy without its client half (SCAFFOLD, FedDyn) or with another alpha (FedDyn)."""
    for server, client in PAIRED.items():
        if (strategy_name == server) != (algorithm.name == client):
            raise _spec_error(
                "client_algorithm.name",
                f"the {server} strategy and the {client} client algorithm go together "
                f"(strategy {strategy_name!r}, client algorithm {algorithm.name!r})",
            )
    if strategy_name == "FedDyn":
        server_alpha = strategy_params["alpha"]
        client_alpha = algorithm.params.get("alpha")
        if client_alpha != server_alpha:
            raise _spec_error(
                "client_algorithm.alpha",
                f"must equal strategy.params.alpha = {server_alpha!r} (FedDyn's server and clients share it), "
                f"got {client_alpha!r}",
            )
