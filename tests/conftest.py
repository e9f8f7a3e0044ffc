"""Tests are split by what they need: tests/unit/ needs nothing but the code (make test-unit),
tests/integration/ starts real services (Prefect, MLflow, DVC, Label Studio, PostgreSQL, a
browser). Nothing reaches the internet from either."""

from __future__ import annotations

from services import offline as _offline  # noqa: F401

# A plugin must be named at the root: the session's one Label Studio server (fixture `labelstudio`)
pytest_plugins = ["tests.integration.ls_server"]
