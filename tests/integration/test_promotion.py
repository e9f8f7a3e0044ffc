"""Promotion against a real MLflow store: a fix is promoted without audit rows, a model that only
raises val accuracy is not, and a crash or a Prefect retry at each step of the promotion ends
as an undisturbed promotion does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prefect import flow

from services import tracking
from tasks.runs import log_model_run, promote
from tasks.training import evaluate_checkpoint
from xbl.config import load_config
from xbl.data.digits import decoy_digits
from xbl.data.prepared import AUDIT, PreparedData
from xbl.feedback.masks import write_feedback
from xbl.judge.promotion import level_for
from xbl.train.checkpoint import load_model
from xbl.train.fit import fit
from xbl.train.retrain import retraining

CONFIG = load_config(Path(__file__).resolve().parents[2] / "params.yaml")
NAME = "judge-model"


def _without_audit(data: PreparedData) -> PreparedData:
    """The same images as a user's manifest without audit rows would give."""
    return data.take(data.split != AUDIT)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """decoy-digits (with and without its audit rows), the shortcut baseline, a feedback model
    retrained on 25 answers that marked the decoy, and those answers as a round's manifest."""
    root = tmp_path_factory.mktemp("judge")
    data = decoy_digits(seed=3)
    data.save(root / "with-audit")
    _without_audit(data).save(root / "no-audit")
    train = replace(CONFIG.train, seed=3)
    base = fit(data, train, root / "baseline.pt")
    pool = data.indices("train")
    marked = np.sort(np.random.default_rng(3).choice(pool, 25, replace=False))
    W = np.asarray(data.confounder[marked])
    plan = retraining(
        data, train, CONFIG.feedback, marked, W, judged=load_model(base.checkpoint)[0]
    )
    fixed = fit(data, plan.train, root / "feedback.pt", init=plan.init, feedback=plan.feedback)
    queries = {str(data.ids[i]): {"index": int(i), "round": 1} for i in marked}
    masks = {str(data.ids[i]): w for i, w in zip(marked, W)}
    manifest = write_feedback(root / "feedback" / "round-001", queries, masks, {}, [], {})
    return root, base, fixed, str(manifest)


def _logged(project: Path, parent: str, name: str, trained, dataset: Path, rnd: int | None):
    tags = {tracking.ROUND_TAG: str(rnd)} if rnd else {}
    return log_model_run.fn(
        str(project),
        parent,
        name,
        {},
        trained,
        evaluate_checkpoint.fn(trained.checkpoint, str(dataset)),
        "v1",
        NAME,
        extra_tags=tags,
    )


@pytest.fixture
def store(tmp_path, monkeypatch, models):
    """A fresh MLflow store holding the baseline and the feedback model as round 1's runs."""
    root, base, fixed, _ = models
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client_for(tmp_path)
    exp = tracking.experiment_id(client, tmp_path, "judge")
    parent = tracking.start_run(client, exp, "round-001")
    baseline = _logged(tmp_path, parent, "baseline", base, root / "no-audit", None)
    candidate = _logged(tmp_path, parent, "feedback-round-1", fixed, root / "no-audit", 1)
    return tmp_path, client, exp, baseline, candidate


def _promote(project: Path, baseline: dict, candidate: dict, dataset: Path, manifest: str):
    return promote.fn(
        str(project),
        NAME,
        "v1",
        baseline,
        candidate,
        CONFIG.promotion,
        str(dataset),
        [manifest],
        CONFIG.query,
    )


def _champion_run(client) -> str | None:
    version = tracking.alias_version(client, NAME, "champion")
    return version.run_id if version else None


def test_a_fix_is_promoted_on_data_without_audit_rows_and_a_retry_reuses_the_decision(
    store, models
):
    project, client, _, baseline, candidate = store
    root, _, _, manifest = models
    result = _promote(project, baseline, candidate, root / "no-audit", manifest)
    assert result["promoted"], result["reason"]
    assert result["evidence"].startswith("counterfactual audit, ")
    assert "McNemar p = " in result["reason"] and result["p_value"] < result["level"]
    assert _champion_run(client) == candidate["run_id"]
    tags = client.get_run(candidate["run_id"]).data.tags
    assert tags[tracking.PROMOTED_TAG] == "true"
    assert tags[tracking.COMPARED_WITH_TAG] == baseline["run_id"]
    # a retry after the alias moved: the recorded decision, never the candidate against itself
    again = _promote(project, baseline, candidate, root / "no-audit", manifest)
    assert again["promoted"] and again["reason"] == result["reason"]
    assert again["champion"]["run_id"] == baseline["run_id"]
    # the share of attribution on the shortcut's cells of the counterfactual images: the fix
    # puts a fraction of what the shortcut model puts there
    shortcut, fix = (
        1 - result[f"{role}_evidence_explanation_score"] for role in ("champion", "candidate")
    )
    assert fix < shortcut / 3
    assert "on the audit images " in result["reason"]


def test_confounder_masks_in_the_manifest_are_evidence_before_any_round_is_answered(store, models):
    project, _, _, baseline, candidate = store
    root = models[0]
    result = promote.fn(
        str(project), NAME, "v1", baseline, candidate, CONFIG.promotion,
        str(root / "no-audit"), [], CONFIG.query,
    )  # fmt: skip
    assert "confounder masks from the manifest localised in the val images" in result["evidence"]
    assert result["promoted"], result["reason"]


def test_each_later_comparison_on_the_same_images_is_tested_at_a_smaller_level(store, models):
    project, client, exp, baseline, candidate = store
    root, _, fixed, manifest = models
    first = _promote(project, baseline, candidate, root / "no-audit", manifest)
    assert first["comparison_number"] == 1 and first["promoted"]
    parent = tracking.start_run(client, exp, "round-002")
    later = _logged(project, parent, "feedback-round-2", fixed, root / "no-audit", 2)
    second = _promote(project, baseline, later, root / "no-audit", manifest)
    assert second["comparison_number"] == 2
    assert second["level"] == pytest.approx(level_for(CONFIG.promotion.level, 2))
    assert not second["promoted"]  # the same model again: no better than the champion
    assert "comparison 2 on these images" in second["reason"]
    assert _champion_run(client) == candidate["run_id"]


def test_a_candidate_that_only_raises_val_accuracy_is_not_promoted(store, models):
    """The fixed model is champion; the shortcut model reads the decoy, so it wins on the
    confounded val split, and loses on both kinds of audit."""
    project, client, _, baseline, fixed = store
    root, _, _, manifest = models
    tracking.set_alias(client, NAME, "champion", fixed["model_version"])
    assert baseline["metrics"]["val_accuracy"] > fixed["metrics"]["val_accuracy"]
    for dataset in ("with-audit", "no-audit"):
        tags = client.get_run(baseline["run_id"]).data.tags
        for key in (tracking.DECISION_TAG, tracking.PROMOTION_TAG):
            if key in tags:  # judge afresh on the other data
                client.delete_tag(baseline["run_id"], key)
        # the round's baseline (the shortcut model) localises the marks, as in a round
        result = _promote(project, baseline, baseline, root / dataset, manifest)
        assert not result["promoted"], result["reason"]
        assert "not better" in result["reason"]
        assert result["champion"]["run_id"] == fixed["run_id"]
        assert _champion_run(client) == fixed["run_id"]


def test_a_crash_before_the_alias_moves_is_finished_from_the_record(store, models, monkeypatch):
    project, client, exp, baseline, candidate = store
    root, _, _, manifest = models

    def crash(*_args, **_kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(tracking, "set_alias", crash)
    with pytest.raises(SystemExit):
        _promote(project, baseline, candidate, root / "no-audit", manifest)
    monkeypatch.undo()
    assert _champion_run(client) is None  # the decision is recorded, the round not yet done
    assert tracking.PROMOTION_TAG not in client.get_run(candidate["run_id"]).data.tags
    assert 1 not in tracking.completed_rounds(client, exp)
    # the next run's first step (read_round_state) finishes it from the record
    assert tracking.finish_recorded_promotions(client, exp) == [candidate["run_id"]]
    assert _champion_run(client) == candidate["run_id"]
    assert 1 in tracking.completed_rounds(client, exp)


def test_a_crash_after_the_alias_moved_never_deletes_the_champion(store, models):
    project, client, exp, baseline, candidate = store
    root, _, _, manifest = models
    _promote(project, baseline, candidate, root / "no-audit", manifest)
    client.delete_tag(candidate["run_id"], tracking.PROMOTION_TAG)  # died just before it
    # a resumed round discards what did not finish: never the champion's model version
    tracking.discard_incomplete_round(client, exp, NAME, 1)
    assert _champion_run(client) == candidate["run_id"]


def test_a_prefect_retry_reuses_the_recorded_decision(store, models, monkeypatch):
    project, client, _, baseline, candidate = store
    root, _, _, manifest = models
    real, calls = tracking.set_alias, []

    def flaky(*args, **kwargs):  # the tracking server drops the first alias request
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("tracking server unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "set_alias", flaky)

    @flow
    def judged():
        return promote(
            str(project),
            NAME,
            "v1",
            baseline,
            candidate,
            CONFIG.promotion,
            str(root / "no-audit"),
            [manifest],
            CONFIG.query,
        )

    result = judged()
    assert len(calls) == 2 and result["promoted"]
    assert result["champion"]["run_id"] == baseline["run_id"]
    assert _champion_run(client) == candidate["run_id"]
