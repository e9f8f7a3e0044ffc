"""Prefect tasks: one pipeline step each, where the side effects live."""

from services import offline as _offline  # noqa: F401  (must run before prefect/mlflow/dvc import)
from xbl.errors import XblError


def is_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry an outage or a crash, never an error that names
    something the user must fix (a bad manifest fails once, not three times)."""
    try:
        state.result()
    except XblError:
        return False
    except BaseException:  # noqa: BLE001  (any other failure may pass on a second try)
        return True
    return True


# How a task that talks to a service (Label Studio, MLflow, DVC) rides out a short outage: three
# more tries, 2, 5 and 15 s apart. Steps that are mostly local work retry less (tasks/data.py).
SERVICE_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 5, 15],
    "retry_condition_fn": is_transient,
}
