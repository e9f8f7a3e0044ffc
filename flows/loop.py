"""A feedback round: prepare → baseline → select → push → wait → masks → retrain → compare.

A round may span several runs (`wait.mode: resume`): a run that pushed queries ends, and a
later run (scheduled or triggered) finds the open round in Label Studio, collects what is
annotated and retrains once the target is met. Which step is done is read from the services.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prefect import flow, get_run_logger

from flows.baseline import run_dir
from tasks import tracking
from tasks.annotation import (annotation_target, collect_feedback_masks, oracle_answers,
                              push_queries, round_progress, wait_for_annotations)
from tasks.data import prepare_data, version_feedback
from tasks.queries import select_round_queries
from tasks.rounds import queries_from_labelstudio, read_round_state, restore_baseline
from tasks.runs import (close_run, compare_children, log_model_run, open_parent_run, promote,
                        set_model_alias)
from tasks.training import evaluate_checkpoint, train_baseline, train_with_feedback
from xbl.config import load_params

FEEDBACK_ROOT = "data/feedback"


def finished_rounds(project: Path) -> list[Path]:
    """Feedback manifests of the rounds already collected, oldest first."""
    manifests = (project / FEEDBACK_ROOT).glob("round-*/manifest.csv")
    return sorted(manifests, key=lambda p: int(p.parent.name.split("-")[1]))


def crash_point(step: str) -> None:
    """Fault drill: XBL_CRASH_AFTER=<step> kills this process right after that step, as a
    power cut would, so tests can check that the next run carries on with nothing lost."""
    if os.environ.get("XBL_CRASH_AFTER") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def project_title(params: dict) -> str:
    return f"{params['labelstudio'].get('project_prefix', 'xbl')}-{params['mlflow']['experiment']}"


def earlier_feedback(project: Path, completed: tuple[int, ...]) -> list[str]:
    return [str(m) for m in finished_rounds(project) if int(m.parent.name.split("-")[1]) in completed]


@flow(name="xbl-feedback-round", log_prints=True)
def feedback_round_flow(project: str = ".", params_file: str = "params.yaml",
                        wait_mode: str | None = None) -> dict:
    root = Path(project).resolve()
    params = load_params(root / params_file)
    mode = wait_mode or params["wait"].get("mode", "block")
    name, experiment, title = (params["mlflow"]["model_name"], params["mlflow"]["experiment"],
                               project_title(params))
    runs, logger = run_dir(root), get_run_logger()

    data = prepare_data(str(root), params_file)
    state = read_round_state(str(root), experiment, title)
    n = state.number
    rounds_dir = str(root / "data" / "rounds" / f"round-{n}")
    if state.open:
        logger.info("round %d is open in Label Studio: resuming it", n)
        base, baseline = restore_baseline(str(root), experiment, name, state.baseline_run_id, n,
                                          str(runs / "baseline"))
        parent = baseline["parent_run_id"]
    else:
        parent = open_parent_run(str(root), experiment, f"round-{n}", data.version)
        base = train_baseline(data.path, params["train"], str(runs / "baseline.pt"))
        baseline = log_model_run(str(root), parent, "baseline", params["train"], base,
                                 evaluate_checkpoint(base.checkpoint, data.path), data.version, name)
        set_model_alias(str(root), name, "baseline", baseline["model_version"])
        select_round_queries(base.checkpoint, data.path, params["query"], n,
                             list(state.queried), rounds_dir)
        push_queries(f"{rounds_dir}/queries.json", title, baseline["run_id"])
        crash_point("push")
    queries = queries_from_labelstudio(title, n, data.path, rounds_dir)

    if params["labelstudio"].get("annotator", "human") == "oracle":
        oracle_answers(title, n, data.path, queries,
                       float(params["labelstudio"].get("oracle_overlap", 0.1)))
    if mode == "block":
        wait_for_annotations(title, n, params["wait"])
    else:
        annotated, total = round_progress(title, n)
        if annotated < annotation_target(total, params["wait"]):
            logger.info("round %d: %d/%d annotated; a later run will carry on", n, annotated, total)
            close_run(str(root), parent)
            return {"round": n, "status": "waiting", "annotated": annotated, "total": total}

    crash_point("wait")
    manifest = collect_feedback_masks(title, n, queries, str(root / FEEDBACK_ROOT / f"round-{n}"))
    feedback_version = version_feedback(str(root), FEEDBACK_ROOT)
    tuned = train_with_feedback(data.path, base.checkpoint,
                                [*earlier_feedback(root, state.completed), manifest],
                                params["train"], params["feedback"], str(runs / "feedback.pt"))
    feedback = log_model_run(str(root), parent, f"feedback-round-{n}",
                             {**params["train"], "feedback": params["feedback"]}, tuned,
                             evaluate_checkpoint(tuned.checkpoint, data.path), data.version, name,
                             extra_tags={tracking.FEEDBACK_VERSION_TAG: feedback_version,
                                         tracking.ROUND_TAG: str(n)},
                             extra_files=(str(root / f"{FEEDBACK_ROOT}.dvc"),))
    crash_point("retrain")
    promotion = promote(str(root), name, baseline, feedback, params["promotion"])
    close_run(str(root), parent)
    table = compare_children(str(root), parent)
    logger.info("round %d done; promotion: %s", n, promotion["reason"])
    return {"round": n, "status": "done", "parent_run_id": parent, "baseline": baseline,
            "feedback": feedback, "promotion": promotion, "table": table,
            "labelstudio_url": _project_url(title), "data_version": data.version,
            "feedback_version": feedback_version}


def _project_url(title: str) -> str:
    from tasks import labelstudio as ls

    client = ls.connect()
    return ls.project_link(client, ls.find_project(client, title))
