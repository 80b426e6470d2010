"""Fixtures of the stack tests."""

from tests.stub_http import stub_server  # noqa: F401 (fixture)
