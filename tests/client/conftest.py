"""Fixtures of the client tests."""

from tests.stub_http import stub_server  # noqa: F401 (fixture)
