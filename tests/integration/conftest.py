"""Integration tests: real Prefect, MLflow, DVC, Label Studio, PostgreSQL or a browser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.project import TINY_TRAIN, make_project


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    """A real (temporary) Prefect server for every flow the tests run."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return make_project(tmp_path / "project", train=TINY_TRAIN)
