"""Shared test setup: offline defaults, and one Prefect test server for the whole session."""

import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Stage-input hashes are remembered across runs (opd_core/hash_memo.py): not in the real home.
os.environ.setdefault(
    "OPD_HASH_MEMO", os.path.join(tempfile.mkdtemp(prefix="opd-test-"), "file_hashes.sqlite")
)

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server (SQLite) shared by every test that runs flows."""
    # Imported here: prefect takes seconds to import, and most test files never start a flow.
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
