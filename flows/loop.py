"""A feedback round: prepare → baseline → select → push → wait → masks → retrain → compare.

A round may span several runs (`wait.mode: resume`): a run that pushed queries ends, and a
later run (scheduled or triggered) finds the open round in Label Studio, collects what is
annotated and retrains once the target is met. Which step is done is read from the services.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.baseline import run_dir
from tasks import tracking
from tasks.annotation import (annotation_target, collect_feedback_masks, oracle_answers,
                              push_queries, round_progress, wait_for_annotations)
from tasks.data import FEEDBACK_ROOT, DataRef, prepare_data, version_feedback
from tasks.queries import select_round_queries
from tasks.rounds import (discard_unpushed, queries_from_labelstudio, read_round_state,
                          restore_baseline)
from tasks.runs import (close_run, compare_children, log_model_run, open_parent_run, promote,
                        set_model_alias)
from tasks.training import evaluate_checkpoint, train_baseline, train_with_feedback
from xbl.config import load_params

def finished_rounds(project: Path) -> list[Path]:
    """Feedback manifests of the rounds already collected, oldest first."""
    manifests = (project / FEEDBACK_ROOT).glob("round-*/manifest.csv")
    return sorted(manifests, key=lambda p: int(p.parent.name.split("-")[1]))


def crash_point(step: str) -> None:
    """Fault drill: XBL_CRASH_AFTER=baseline|push|wait|retrain kills this process right after
    that step, as a power cut would, so tests can check that the next run loses nothing."""
    if os.environ.get("XBL_CRASH_AFTER") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def project_title(params: dict) -> str:
    return f"{params['labelstudio'].get('project_prefix', 'xbl')}-{params['mlflow']['experiment']}"


def earlier_feedback(project: Path, completed: tuple[int, ...]) -> list[str]:
    return [str(m) for m in finished_rounds(project) if int(m.parent.name.split("-")[1]) in completed]


@dataclass
class _Round:
    """What every step of round `n` needs to know."""
    root: Path
    params: dict
    n: int
    title: str
    data: DataRef

    @property
    def model_name(self) -> str:
        return self.params["mlflow"]["model_name"]

    @property
    def experiment(self) -> str:
        return self.params["mlflow"]["experiment"]

    @property
    def rounds_dir(self) -> str:
        return str(self.root / "data" / "rounds" / f"round-{self.n}")


@flow(name="xbl-feedback-round", log_prints=True)
def feedback_round_flow(project: str = ".", params_file: str = "params.yaml",
                        wait_mode: str | None = None) -> dict:
    root = Path(project).resolve()
    params = load_params(root / params_file)
    mode = wait_mode or params["wait"].get("mode", "block")
    title = project_title(params)
    data = prepare_data(str(root), params_file)
    state = read_round_state(str(root), params["mlflow"]["experiment"], title)
    rnd = _Round(root, params, state.number, title, data)
    base, baseline, parent = _open_round(rnd, state)
    queries = queries_from_labelstudio(title, rnd.n, data.path, rnd.rounds_dir)
    if params["labelstudio"].get("annotator", "human") == "oracle":
        oracle_answers(title, rnd.n, data.path, queries,
                       float(params["labelstudio"].get("oracle_overlap", 0.1)))
    waiting = _await_annotations(rnd, mode)
    if waiting is not None:
        close_run(str(root), parent)
        return waiting
    crash_point("wait")
    return _retrain_and_promote(rnd, state, queries, base, baseline, parent)


def _open_round(rnd: _Round, state) -> tuple:
    """Resume the open round's baseline from MLflow, or train a new baseline and push its
    queries. Returns (baseline checkpoint outcome, baseline run, parent run id)."""
    runs = run_dir(rnd.root)
    if state.open:
        get_run_logger().info("round %d is open in Label Studio: resuming it", rnd.n)
        base, baseline = restore_baseline(str(rnd.root), rnd.experiment, rnd.model_name,
                                          state.baseline_run_id, rnd.n, str(runs / "baseline"))
        return base, baseline, baseline["parent_run_id"]
    root, data = str(rnd.root), rnd.data
    discard_unpushed(root, rnd.experiment, rnd.model_name, rnd.n)
    parent = open_parent_run(root, rnd.experiment, f"round-{rnd.n}", data.version)
    base = train_baseline(data.path, rnd.params["train"], str(runs / "baseline.pt"))
    baseline = log_model_run(root, parent, "baseline", rnd.params["train"], base,
                             evaluate_checkpoint(base.checkpoint, data.path), data.version,
                             rnd.model_name)
    set_model_alias(root, rnd.model_name, "baseline", baseline["model_version"])
    crash_point("baseline")
    select_round_queries(base.checkpoint, data.path, rnd.params["query"], rnd.n,
                         list(state.queried), rnd.rounds_dir)
    push_queries(f"{rnd.rounds_dir}/queries.json", rnd.title, baseline["run_id"])
    crash_point("push")
    return base, baseline, parent


def _await_annotations(rnd: _Round, mode: str) -> dict | None:
    """`block`: poll until the target is met (or fail clearly). `resume`: None when the target
    is met, else the progress, and this run ends: a later one carries on."""
    if mode == "block":
        wait_for_annotations(rnd.title, rnd.n, rnd.params["wait"])
        return None
    annotated, total = round_progress(rnd.title, rnd.n)
    if annotated >= annotation_target(total, rnd.params["wait"]):
        return None
    get_run_logger().info("round %d: %d/%d annotated; a later run will carry on", rnd.n,
                          annotated, total)
    return {"round": rnd.n, "status": "waiting", "annotated": annotated, "total": total}


def _retrain_and_promote(rnd: _Round, state, queries, base, baseline: dict, parent: str) -> dict:
    """Masks → DVC → retrain on every round's feedback → MLflow → promotion → comparison."""
    root, n, params = str(rnd.root), rnd.n, rnd.params
    manifest = collect_feedback_masks(rnd.title, n, queries,
                                      str(rnd.root / FEEDBACK_ROOT / f"round-{n}"))
    feedback_version = version_feedback(root, FEEDBACK_ROOT)
    tuned = train_with_feedback(rnd.data.path, base.checkpoint,
                                [*earlier_feedback(rnd.root, state.completed), manifest],
                                params["train"], params["feedback"],
                                str(run_dir(rnd.root) / "feedback.pt"))
    feedback = log_model_run(root, parent, f"feedback-round-{n}",
                             {**params["train"], "feedback": params["feedback"]}, tuned,
                             evaluate_checkpoint(tuned.checkpoint, rnd.data.path),
                             rnd.data.version, rnd.model_name,
                             extra_tags={tracking.FEEDBACK_VERSION_TAG: feedback_version,
                                         tracking.ROUND_TAG: str(n)},
                             extra_files=(str(rnd.root / f"{FEEDBACK_ROOT}.dvc"),))
    crash_point("retrain")
    promotion = promote(root, rnd.model_name, baseline, feedback, params["promotion"])
    close_run(root, parent)
    table = compare_children(root, parent)
    get_run_logger().info("round %d done; promotion: %s", n, promotion["reason"])
    return {"round": n, "status": "done", "parent_run_id": parent, "baseline": baseline,
            "feedback": feedback, "promotion": promotion, "table": table,
            "labelstudio_url": _project_url(rnd.title), "data_version": rnd.data.version,
            "feedback_version": feedback_version}


def _project_url(title: str) -> str:
    from tasks import labelstudio as ls

    client = ls.connect()
    return ls.project_link(client, ls.find_project(client, title))
