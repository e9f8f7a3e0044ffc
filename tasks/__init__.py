"""Prefect tasks: one pipeline step each, where the side effects live."""

from services import offline as _offline  # noqa: F401  (must run before prefect/mlflow/dvc import)

# How a task that talks to a service (Label Studio, MLflow, DVC) rides out a short outage: three
# more tries, 2, 5 and 15 s apart. Steps that are mostly local work retry less (tasks/data.py).
SERVICE_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}
