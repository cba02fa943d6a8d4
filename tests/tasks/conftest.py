import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """Tasks publish Prefect artifacts: give them a throwaway Prefect API."""
    with prefect_test_harness(server_startup_timeout=60):
        yield
