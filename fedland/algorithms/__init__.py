"""Client training algorithms and the server strategies that pair with them.

The contract (`ClientAlgorithm`, `MemberData`, `LocalHyperparameters`,
`LocalResult`) is in `fedland.algorithms.contract`. ``CLIENT_ALGORITHMS`` maps
each built-in name to its class; a class's fields are the algorithm's
parameters (``SCAFFOLD`` and ``FedDyn`` need their server strategies,
`ScaffoldStrategy` and `FedDynStrategy`; `SWA` wraps any averaging strategy).
"""

from __future__ import annotations

# fedland.strategies registers the server halves below in STRATEGIES: it must be imported first
import fedland.strategies  # noqa: F401  isort: skip
from fedland.algorithms.contract import (
    ClientAlgorithm,
    LocalHyperparameters,
    LocalResult,
    MemberData,
    local_sgd,
    round_payload,
)
from fedland.algorithms.feddyn import FedDyn, FedDynStrategy
from fedland.algorithms.sam import FedASAM, FedSAM
from fedland.algorithms.scaffold import Scaffold, ScaffoldStrategy
from fedland.algorithms.sgd import SGD
from fedland.algorithms.swa import SWA, FedSWA, cyclical_learning_rate, is_averaged_round, swa_weights

__all__ = [
    "CLIENT_ALGORITHMS",
    "SGD",
    "SWA",
    "ClientAlgorithm",
    "FedASAM",
    "FedDyn",
    "FedDynStrategy",
    "FedSAM",
    "FedSWA",
    "LocalHyperparameters",
    "LocalResult",
    "MemberData",
    "Scaffold",
    "ScaffoldStrategy",
    "cyclical_learning_rate",
    "is_averaged_round",
    "local_sgd",
    "round_payload",
    "swa_weights",
]

#: The built-in client algorithms by name; each class's fields are its parameters.
CLIENT_ALGORITHMS: dict[str, type[ClientAlgorithm]] = {
    "SGD": SGD,
    "SCAFFOLD": Scaffold,
    "FedDyn": FedDyn,
    "FedSAM": FedSAM,
    "FedASAM": FedASAM,
}
