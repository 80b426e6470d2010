"""fedland: loss-landscape metrics and the data/spec logic of the fedland stack."""

__version__ = "0.1.0"
