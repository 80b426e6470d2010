"""Example components for a fedland workspace: a model, a dataset, a client algorithm (see examples/README.md)."""
