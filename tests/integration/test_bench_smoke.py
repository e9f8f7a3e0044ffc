"""The benchmarks run end to end on tiny settings and write well-formed results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow import MlflowClient

from bench import cost, efficacy, lesions, propagation, protocol, throughput
from bench.common import Clicks, imperfect


@pytest.fixture
def tracking_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/bench.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_quick_efficacy_writes_json_markdown_plot_and_mlflow_runs(tmp_path, tracking_store):
    out = tmp_path / "results"
    efficacy.main(
        [
            "--quick",
            "--epochs",
            "1",
            "--baseline-epochs",
            "2",
            "--out-dir",
            str(out),
            "--project",
            str(tmp_path),
        ]
    )
    text = (out / "efficacy.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    settings = result["settings"]
    assert settings["quick"] and settings["seeds"] == [0]
    assert settings["methods"] == ["rrr", "hint"]
    seed = result["per_seed"][0]
    ref = seed["reference"]
    vanilla, clean = ref["vanilla"]["audit_accuracy"], ref["clean"]["audit_accuracy"]
    for run in seed["runs"]:
        assert 0.0 <= run["audit_accuracy"] <= 1.0 and "test_accuracy" not in run
        assert run["annotated"] == run["budget"]
        assert 0.0 <= run["decoy_marked"] <= run["decoy_shown"] <= 1.0
        if clean > vanilla:  # tiny training may leave no gap: recovery is then undefined (null)
            expected = (run["audit_accuracy"] - vanilla) / (clean - vanilla)
            assert math.isclose(run["audit_recovery"], expected)
        else:
            assert run["audit_recovery"] is None
    kinds = {(r["grid"], r["annotator"]) for r in seed["runs"]}
    assert kinds >= {(4, "perfect"), (7, "perfect"), (4, "wrong"), (4, "incomplete")}
    choices = result["choices"]
    assert set(choices["methods"]) == {"rrr", "hint"} and choices["default"] in {"rrr", "hint"}
    assert {c["init"] for c in choices["methods"].values()} <= {"scratch", "warm"}
    test = result["test"]["per_seed"][0]  # the test split, read once per chosen configuration
    assert set(test["methods"]) == {"rrr", "hint"}
    for m in test["methods"].values():
        assert 0.0 <= m["test_accuracy"] <= 1.0
    md = (out / "efficacy.md").read_text()
    assert "| rrr |" in md and "Test, reported once" in md and "torch" in md and "CPU" in md
    assert (out / "efficacy.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_store)
    exp = client.get_experiment_by_name("xbl-bench-efficacy")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # parent, vanilla + clean, one per retraining, one test-once
    assert len(runs) == 1 + 2 + len(seed["runs"]) + 1
    children = [r for r in runs if r.data.params.get("kind") == "feedback"]
    assert all("audit_accuracy" in r.data.metrics for r in children)


def test_the_protocol_never_chooses_an_undefined_score_and_keeps_the_earlier_on_a_tie():
    nan = float("nan")
    assert protocol.best({"a": 0.2, "b": nan, "c": 0.2}) == "a"
    assert protocol.best({"a": (nan, nan), "b": (-0.5, 0.1)}) == "b"
    ran = [{"diverged": False, "audit_recovery": 0.5}, {"diverged": True, "audit_recovery": 0.9}]
    assert math.isnan(protocol.seed_mean(ran)[0])  # a seed diverged: the pipeline would stop
    assert protocol.seed_mean(ran[:1]) == (0.5, 0.0)
    assert protocol.recovery(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert math.isnan(protocol.recovery(0.7, 0.9, 0.5))  # no gap to close
    scores = {(1.0, "scratch"): 0.1, (10.0, "scratch"): 0.3, (10.0, "warm"): 0.2}
    chosen = protocol.choose_lambda_and_start(lambda *s: scores.get(s, nan), [1.0, 10.0])
    assert (chosen["lambda"], chosen["init"]) == (10.0, "scratch")  # λ first, then the start


def test_imperfect_annotators_spoil_nested_answers_in_one_direction():
    rng = np.random.default_rng(0)
    ignored = rng.random((40, 8)) < 0.3
    clicks = Clicks(np.arange(40), np.zeros((40, 8, 2), dtype=int), ignored, 4)
    previous = {"wrong": ignored, "incomplete": ignored}
    for rate in (0.1, 0.3, 0.5):
        wrong = imperfect(clicks, "wrong", rate, seed=1).ignored
        missed = imperfect(clicks, "incomplete", rate, seed=1).ignored
        assert (wrong >= ignored).all() and (missed <= ignored).all()  # only add / only drop
        assert (wrong >= previous["wrong"]).all() and (missed <= previous["incomplete"]).all()
        previous = {"wrong": wrong, "incomplete": missed}
    assert imperfect(clicks, "wrong", 0.0, seed=1).ignored.tolist() == ignored.tolist()
    assert not imperfect(clicks, "incomplete", 1.0, seed=1).ignored.any()


def test_cost_writes_ratios_beside_recoveries_for_every_schedule(tmp_path):
    out = tmp_path / "cost.json"
    cost.main(
        [
            "--quick",
            "--epochs",
            "1",
            "--train-epochs",
            "1",
            "--fractions",
            "0.02,1.0",
            "--models",
            "small_cnn",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    default = result["settings"]["default_method"]
    schedules = [s.name for s in cost.SCHEDULES]
    rows = result["cost"]
    # every schedule for the default method; today's and the pipeline's for the others
    timed = {default: schedules, "counterexamples": [schedules[0], "6 every 4th step"]}
    expected = [("plain", None, None)] + [
        (m, f, s) for m in timed for s in timed[m] for f in (0.02, 1.0)
    ]
    assert [(r["method"], r["annotated_fraction"], r["schedule"]) for r in rows] == expected
    plain = rows[0]
    assert plain["ratio_to_plain"] == 1.0 and plain["seconds_per_epoch"] > 0
    for r in rows[1:]:
        # against the plain run timed beside its (method, schedule)
        ratio = r["seconds_per_epoch"] / r["plain_seconds_per_epoch"]
        assert r["ratio_to_plain"] == pytest.approx(ratio)
        steps = r["steps_seconds_per_epoch"] / r["plain_steps_seconds_per_epoch"]
        assert r["steps_ratio_to_plain"] == pytest.approx(steps)
        # the training steps alone take less than the epoch with its validation pass
        assert 0 < r["steps_seconds_per_epoch"] < r["seconds_per_epoch"]
        assert r["annotated_images"] == max(1, round(r["annotated_fraction"] * 1078))
    groups = {}
    for r in rows[1:]:
        groups.setdefault((r["method"], r["schedule"]), set()).add(r["plain_seconds_per_epoch"])
    assert all(len(plains) == 1 for plains in groups.values())  # one plain per group
    # every schedule's effect for the default method; today's for the others
    measured = {(r["method"], r["schedule"]) for r in result["efficacy"]}
    assert measured == {(default, s) for s in schedules} | {("counterexamples", schedules[0])}
    assert {(g["model"], g["schedule"]) for g in result["goals"]} == {
        ("small_cnn", s) for s in schedules
    }
    text = out.with_suffix(".md").read_text()
    assert f"| {default} | 16 every 12th step |" in text and "## Goals" in text
    # the pipeline's own schedule (params.yaml) is marked, and only it
    marked = [g["schedule"] for g in result["goals"] if g["default"]]
    assert marked == ["6 every 4th step"] and "6 every 4th step (default)" in text

    # timing again reuses the recoveries instead of retraining, and says so; a schedule the
    # earlier run lacks is retrained, and only it
    newest = schedules[-1]
    earlier = {**result, "efficacy": [r for r in result["efficacy"] if r["schedule"] != newest]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    again = tmp_path / "again.json"
    args = ["--quick", "--epochs", "1", "--train-epochs", "1", "--fractions", "0.02,1.0"]
    cost.main(
        [*args, "--models", "small_cnn", "--efficacy-from", str(tmp_path / "earlier.json")]
        + ["--out", str(again)]
    )
    reused = json.loads(again.read_text())
    assert reused["efficacy"][: len(earlier["efficacy"])] == earlier["efficacy"]
    retrained = reused["efficacy"][len(earlier["efficacy"]) :]
    assert {(r["method"], r["schedule"]) for r in retrained} == {(default, newest)}
    assert reused["efficacy_from"]["retrained"] == [f"{default}, {newest}"]
    assert reused["efficacy_from"]["date"] == result["machine"]["date"]
    assert "earlier.json" in again.with_suffix(".md").read_text()


def test_a_schedule_sets_the_images_and_steps_and_leaves_lambda_to_the_loop():
    every_step, few, sparse = cost.SCHEDULES[0], cost.SCHEDULES[1], cost.SCHEDULES[3]
    base = {"per_batch": 16}
    lam = cost.METHOD_LAMBDA["rrr"]
    assert few.settings("rrr", base) == {"per_batch": 4, "lambda": lam, "every": 1}
    assert sparse.settings("rrr", base)["every"] == 12  # the loop weights it λ·12
    assert every_step.settings("rrr", base) == {"per_batch": 16, "lambda": lam, "every": 1}


def test_schedules_are_chosen_by_name_and_a_typo_stops_the_run():
    chosen = cost._chosen_schedules("6 every 4th step,16 every step")
    assert [s.name for s in chosen] == ["6 every 4th step", "16 every step"]
    assert cost._chosen_schedules(None) == cost.SCHEDULES
    with pytest.raises(SystemExit, match="6 every fourth step"):
        cost._chosen_schedules("6 every fourth step")


def test_throughput_compares_xbl_with_a_bare_loop(tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--epochs", "1", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["images_per_s"]["xbl"] > 0 and written["images_per_s"]["bare"] > 0
    assert written["xbl_over_bare_time"] == pytest.approx(
        result["seconds"]["xbl"][0] / result["seconds"]["bare"][0]
    )


def test_lesions_bench_chooses_on_audit_and_reads_test_once(tmp_path):
    out = tmp_path / "lesions.json"
    result = lesions.main(["--quick", "--n-per-class", "12", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["model"] == "resnet18"
    seed = result["per_seed"][0]
    ref = seed["reference"]
    study = [r for r in seed["runs"] if (r["strategy"], r["budget"]) == ("entropy", 25)]
    assert {r["init"] for r in study} == {"scratch", "warm"}
    choice = result["choices"]["rrr_output"]
    best = max(
        study, key=lambda r: -math.inf if r["audit_recovery"] is None else r["audit_recovery"]
    )
    if ref["clean"] > ref["vanilla"]:  # recovery is defined: the choice follows it
        assert choice["init"] == best["init"]
    for run in seed["runs"]:
        assert 0.0 <= run["audit_accuracy"] <= 1.0 and "test_accuracy" not in run
    test = result["test"]["per_seed"][0]
    assert set(test["methods"]) == {"rrr_output"}
    assert "## 3. The test split, once" in out.with_suffix(".md").read_text()


def test_propagation_bench_counts_tasks_chooses_on_audit_and_reads_test_once(tmp_path):
    out = tmp_path / "results"
    args = ["--quick", "--tasks", "1,2", "--threads", "1", "--out-dir", str(out)]
    propagation.main(
        [*args, "--datasets", "decoy-digits,decoy-lesions", "--lesions-per-class", "12"]
    )
    result = json.loads((out / "propagation.json").read_text())
    assert [p["dataset"] for p in result["parts"]] == ["decoy-digits", "decoy-lesions"]
    for part in result["parts"]:
        candidates = [propagation.Propagation(**c) for c in part["settings"]["candidates"]]
        chosen = propagation.Propagation(
            **{k: part["chosen"][k] for k in ("localisation", "reach", "threshold", "confidence")}
        )
        assert chosen in candidates
        for row in part["rows"]:
            assert "test_accuracy" not in row and 0.0 <= row["audit_accuracy"] <= 1.0
            if row["strategy"] in ("entropy", "random", "all"):
                assert row["trained_images"] == row["tasks"]  # one answer, one image
            else:  # the tasks' answers and at most every other pool image carry a mask
                assert row["tasks"] <= row["trained_images"] <= max(part["pool_images"])
                assert row["carried_images"] == row["trained_images"] - row["tasks"]
                for k in ("carried_precision", "carried_recall", "carried_iou"):
                    assert row.get(k) is None or 0.0 <= row[k] <= 1.0
                if not row["strategy"].endswith("review"):
                    assert row["reviews"] == 0
                # per task at most 8 concepts (one per shown cell), each a montage click
                # and at most REVIEW_CAP clicks on its doubtful masks
                assert row["reviews"] <= 8 * (1 + propagation.REVIEW_CAP) * row["tasks"]
        # the test split: once per setting run after the choice, for every seed
        tested = {(t["strategy"], t["tasks"], t["annotator"]) for t in part["tests"]}
        strategies = {"cluster", "cluster +review", "entropy", "random"}
        pool = part["pool_images"][0]
        assert tested == {(s, n, "perfect") for s in strategies for n in (1, 2)} | {
            (s, 2, "wrong") for s in strategies - {"entropy"}
        } | {("all", pool, "perfect")}
        assert all(0.0 <= t["test_accuracy"] <= 1.0 for t in part["tests"])
        assert part["goal"]["tasks"] == 2 and isinstance(part["goal"]["met"], bool)
    md = (out / "propagation.md").read_text()
    assert "## decoy-lesions" in md and "| perfect | cluster | 1 |" in md
    assert (out / "propagation.png").read_bytes()[:4] == b"\x89PNG"


def test_a_feedback_epoch_faster_than_plain_marks_the_timings_invalid():
    rows = [
        {"model": "m", "method": "plain", "ratio_to_plain": 1.0},
        {"model": "m", "method": "rrr_output", "ratio_to_plain": 1.3},
    ]
    assert cost.timing_valid(rows, "m")
    rows.append({"model": "m", "method": "rrr", "ratio_to_plain": 0.8})  # less work than none
    assert not cost.timing_valid(rows, "m")
    assert cost.timing_valid(rows, "another model")
