"""The benchmarks run end to end on tiny settings and write well-formed results."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from bench import cost, efficacy, throughput


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
    assert settings["methods"] == ["rrr", "counterexamples"]
    assert settings["budgets"] == ["25", "all"]
    # per method: 25 by entropy, 25 at random, and all (one run: no choice to make)
    keys = {(r["method"], r["strategy"], r["budget"]) for r in result["summary"]["rows"]}
    assert keys == {
        (m, s, b)
        for m in ("rrr", "counterexamples")
        for s, b in (("entropy", "25"), ("random", "25"), ("all", "all"))
    }
    seed = result["per_seed"][0]
    vanilla, clean = seed["vanilla"]["test_accuracy"], seed["clean"]["test_accuracy"]
    for run in seed["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["annotated"] == (25 if run["budget"] == "25" else result["pool_size"])
        assert 0.0 <= run["decoy_marked"] <= run["decoy_shown"] <= 1.0
        if clean > vanilla:  # tiny training may leave no gap: recovery is then undefined (null)
            expected = (run["test_accuracy"] - vanilla) / (clean - vanilla)
            assert math.isclose(run["recovery"], expected)
        else:
            assert run["recovery"] is None
    assert {a["method"] for a in result["aims"]} == {"rrr", "counterexamples"}
    md = (out / "efficacy.md").read_text()
    assert "| rrr |" in md and "torch" in md and "CPU" in md
    assert (out / "efficacy.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_store)
    exp = client.get_experiment_by_name("xbl-bench-efficacy")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 1 + 2 + len(seed["runs"])  # parent, vanilla + clean, one per retraining
    children = [r for r in runs if r.data.params.get("kind") == "feedback"]
    assert all("test_accuracy" in r.data.metrics for r in children)


def test_cost_writes_ratios_for_every_method_and_fraction(tmp_path):
    out = tmp_path / "cost.json"
    cost.main(
        [
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--fractions",
            "0.02,1.0",
            "--methods",
            "rrr,counterexamples",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    per_batch = result["settings"]["per_batch"]
    assert [(r["method"], r["annotated_fraction"], r["per_batch"]) for r in rows] == [
        ("plain", None, 0),
        ("rrr", 0.02, per_batch),
        ("rrr", 1.0, per_batch),
        ("counterexamples", 0.02, per_batch),
        ("counterexamples", 1.0, per_batch),
        ("rrr", 1.0, 64),
        ("counterexamples", 1.0, 64),
    ]  # + every image penalised
    plain = rows[0]
    assert plain["ratio_to_plain"] == 1.0 and plain["seconds_per_epoch"] > 0
    for r in rows[1:]:
        ratio = r["seconds_per_epoch"] / plain["seconds_per_epoch"]
        assert r["ratio_to_plain"] == pytest.approx(ratio)
        assert r["annotated_images"] == max(1, round(r["annotated_fraction"] * 1078))
    assert "| rrr |" in out.with_suffix(".md").read_text()


def test_throughput_compares_xbl_with_a_bare_loop(tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--epochs", "1", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["images_per_s"]["xbl"] > 0 and written["images_per_s"]["bare"] > 0
    assert written["xbl_over_bare_time"] == pytest.approx(
        result["seconds"]["xbl"][0] / result["seconds"]["bare"][0]
    )
