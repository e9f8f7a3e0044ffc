"""Clients of the outside world: Label Studio, MLflow, DVC, headless Chromium. No Prefect.

`services.offline` runs first: no tool may reach the internet, so telemetry is off before any
of them is imported.
"""

from services import offline as _offline  # noqa: F401
