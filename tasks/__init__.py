"""Prefect tasks: one pipeline step each, where the side effects live."""

from services import offline as _offline  # noqa: F401  (must run before prefect/mlflow/dvc import)
