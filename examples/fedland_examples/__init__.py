"""Example components for a fedland workspace: a model, a client algorithm (see examples/README.md)."""
