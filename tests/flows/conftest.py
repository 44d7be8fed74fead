from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (temporary, SQLite) for the flow tests; 2 cores need a long start-up."""
    with prefect_test_harness(server_startup_timeout=90):
        yield
