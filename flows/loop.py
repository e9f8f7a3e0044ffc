"""One feedback round: prepare → baseline → select → push → wait → masks → retrain → compare."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.baseline import run_dir
from tasks import tracking
from tasks.annotation import (collect_feedback_masks, oracle_answers, push_queries,
                              wait_for_annotations)
from tasks.data import prepare_data, version_feedback
from tasks.queries import select_round_queries
from tasks.runs import (close_run, compare_children, log_model_run, open_parent_run, promote,
                        set_model_alias)
from tasks.training import evaluate_checkpoint, train_baseline, train_with_feedback
from xbl.config import load_params

FEEDBACK_ROOT = "data/feedback"


def finished_rounds(project: Path) -> list[Path]:
    """Feedback manifests of the rounds already collected, oldest first."""
    manifests = (project / FEEDBACK_ROOT).glob("round-*/manifest.csv")
    return sorted(manifests, key=lambda p: int(p.parent.name.split("-")[1]))


def annotated_ids(manifests: list[Path]) -> list[str]:
    return [line.split(",")[0] for m in manifests for line in m.read_text().splitlines()[1:]]


def project_title(params: dict) -> str:
    return f"{params['labelstudio'].get('project_prefix', 'xbl')}-{params['mlflow']['experiment']}"


@flow(name="xbl-feedback-round", log_prints=True)
def feedback_round_flow(project: str = ".", params_file: str = "params.yaml") -> dict:
    root = Path(project).resolve()
    params = load_params(root / params_file)
    earlier = finished_rounds(root)
    n = len(earlier) + 1
    name, runs = params["mlflow"]["model_name"], run_dir(root)

    data = prepare_data(str(root), params_file)
    parent = open_parent_run(str(root), params["mlflow"]["experiment"], f"round-{n}", data.version)

    base = train_baseline(data.path, params["train"], str(runs / "baseline.pt"))
    baseline = log_model_run(str(root), parent, "baseline", params["train"], base,
                             evaluate_checkpoint(base.checkpoint, data.path), data.version, name)
    set_model_alias(str(root), name, "baseline", baseline["model_version"])

    queries = select_round_queries(base.checkpoint, data.path, params["query"], n,
                                   annotated_ids(earlier), str(root / "data" / "rounds" / f"round-{n}"))
    pushed = push_queries(queries, project_title(params), baseline["run_id"])
    if params["labelstudio"].get("annotator", "human") == "oracle":
        oracle_answers(pushed["project_id"], n, data.path, queries,
                       float(params["labelstudio"].get("oracle_overlap", 0.1)))
    wait_for_annotations(pushed["project_id"], n, pushed["created"] + pushed["skipped"],
                         params["wait"])
    manifest = collect_feedback_masks(pushed["project_id"], n, queries,
                                      str(root / FEEDBACK_ROOT / f"round-{n}"))
    feedback_version = version_feedback(str(root), FEEDBACK_ROOT)

    tuned = train_with_feedback(data.path, base.checkpoint, [*map(str, earlier), manifest],
                                params["train"], params["feedback"], str(runs / "feedback.pt"))
    feedback = log_model_run(str(root), parent, f"feedback-round-{n}",
                             {**params["train"], "feedback": params["feedback"]}, tuned,
                             evaluate_checkpoint(tuned.checkpoint, data.path), data.version, name,
                             extra_tags={tracking.FEEDBACK_VERSION_TAG: feedback_version,
                                         "xbl.round": str(n)},
                             extra_files=(str(root / f"{FEEDBACK_ROOT}.dvc"),))
    promotion = promote(str(root), name, baseline, feedback, params["promotion"])
    close_run(str(root), parent)
    table = compare_children(str(root), parent)
    get_run_logger().info("round %d done; promotion: %s", n, promotion["reason"])
    return {"round": n, "parent_run_id": parent, "baseline": baseline, "feedback": feedback,
            "promotion": promotion, "table": table, "labelstudio_url": pushed["url"],
            "data_version": data.version, "feedback_version": feedback_version}
