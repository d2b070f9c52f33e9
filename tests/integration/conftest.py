"""Session-wide fixtures of the integration tests."""

import pytest

from tests.helpers import layout_runs


@pytest.fixture(scope="session")
def layout_pool():
    """The one-host layout runs (tests/helpers/layout_runs.py), each run once per session."""
    return layout_runs.LayoutPool()
