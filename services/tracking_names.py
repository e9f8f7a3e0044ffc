"""Where a project's tracking store is and the names its runs carry (tags, aliases): shared by
services/tracking.py and by the readers that must answer without importing mlflow, which alone
takes over a second (`xbl status`, services/status.py)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_VERSION_TAG = "xbl.data_version"
TRAIN_SETTINGS_TAG = "xbl.train_settings"  # fingerprint of params' train section (a baseline's)
FEEDBACK_VERSION_TAG = "xbl.feedback_version"
ROUND_TAG = "xbl.round"
PROMOTION_TAG = "xbl.promotion"
FEEDBACK_ROUNDS_TAG = "xbl.feedback_rounds"  # the rounds whose masks a feedback run learnt from
QUERY_MODEL_TAG = "xbl.query_model_run"  # on a round's parent: the model that chose its queries
COMPARED_WITH_TAG = "xbl.compared_with"  # on a feedback run: the champion it was judged against
PROMOTED_TAG = "xbl.promoted"  # on a feedback run: true when it became champion
HOLDER_TAG = "xbl.round_holder"  # on a round's parent: the run that opened it (services.lock)
# on a feedback run, before the alias moves: the promotion decision as JSON (promote?, why, the
# evidence, the paired figures, the run compared with); a retry or a rerun reads it back
DECISION_TAG = "xbl.promotion_decision"
CHAMPION, BASELINE = "champion", "baseline"  # registered-model aliases


def tracking_uri(project: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store inside the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project).resolve()}/mlflow.db"
