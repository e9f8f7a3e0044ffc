"""Nothing here may reach the internet: telemetry off in every tool, before any is imported."""

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    # A fresh PREFECT_HOME takes 15-25 s to start the temporary server; the default 20 s fails.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
