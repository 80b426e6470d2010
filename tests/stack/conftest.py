"""Fixtures of these tests: the scripted stub server."""

from tests.stubs import stub_server  # noqa: F401 (a fixture)
