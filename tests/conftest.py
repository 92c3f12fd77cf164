"""The ``slow`` marker: the end-to-end tests (Ray, several processes, the real CLI), 28 of the suite's 31 minutes on
2 cores (durations of one full run, 2026-12-03). ``make test`` runs everything; ``make test-fast``
(``pytest -m "not slow"``) is the inner loop."""

from __future__ import annotations

import pytest

SLOW_MODULES = {
    "test_cli_output",
    "test_deploy_submit",
    "test_hardening_runs",
    "test_object_storage",
    "test_pipeline",
    "test_recovery",
    "test_retrain",
    "test_sequence",
    "test_tune",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end to end (Ray, several processes); left out by make test-fast")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
