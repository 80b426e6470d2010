"""The local launcher: store, server and clients on this machine, progress and summary."""
