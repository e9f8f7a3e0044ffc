"""A variant of a round or a baseline, for one run: flow parameters, `xbl round` options, the
served deployments' parameters, the runner's poll interval, and the links a run leaves."""

from __future__ import annotations

import pytest

from flows import cli
from flows.loop import round_overrides
from tasks.links import artifact_key, mlflow_run_link


def test_lambda_goes_to_the_method_in_use():
    assert round_overrides("rrr_output", feedback_lambda=2.0) == {"feedback.lambda.rrr_output": 2.0}
    assert round_overrides("rrr_output", feedback_method="hint", feedback_lambda=2.0) == {
        "feedback.method": "hint",
        "feedback.lambda.hint": 2.0,
    }
    assert round_overrides("rrr", wait_mode=None, query_k=None) == {}


@pytest.fixture
def fake_round(tmp_path, monkeypatch):
    """`xbl round` with the flow replaced by a recorder (the options reach it, or not)."""
    from flows import loop

    (tmp_path / "params.yaml").write_text("feedback:\n  method: rrr_output\n")
    called = []

    def flow(project, params_file, **given):
        called.append(given)
        return {"status": "waiting", "round": 1, "annotated": 0, "total": 5, "what": "answers"}

    monkeypatch.setattr(loop, "feedback_round_flow", flow)
    return tmp_path, called


def test_round_options_reach_the_flow_as_its_parameters(fake_round):
    project, called = fake_round
    argv = ["--project", str(project), "round", "--method", "rrr", "--lambda", "3"]
    argv += ["--strategy", "margin", "--k", "7", "--wait-mode", "resume"]
    assert cli.main(argv) == 0
    assert called == [
        {
            "wait_mode": "resume",
            "feedback_method": "rrr",
            "feedback_lambda": 3.0,
            "query_strategy": "margin",
            "query_k": 7,
        }
    ]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--k", "0"], "xbl: query.k is 0; allowed: a number above 0"),
        (["--lambda", "-1"], "xbl: feedback.lambda.rrr_output is -1.0; allowed: 0 or more"),
        (
            ["--method", "hint", "--lambda", "-2"],
            "xbl: feedback.lambda.hint is -2.0; allowed: 0 or more",
        ),
    ],
)
def test_a_bad_round_option_is_one_line_before_any_flow_starts(fake_round, capsys, option, message):
    project, called = fake_round
    code = cli.main(["--project", str(project), "round", *option])
    assert code == 2 and called == []
    assert capsys.readouterr().err.strip() == message


def test_a_method_outside_the_config_is_refused_by_the_parser(fake_round):
    project, called = fake_round
    with pytest.raises(SystemExit):
        cli.main(["--project", str(project), "round", "--method", "rrrr"])
    assert called == []


def test_the_served_deployments_take_the_variant_settings_as_parameters(tmp_path):
    (tmp_path / "params.yaml").write_text("schedule:\n  interval_s: 60\n")
    rounds, baseline = cli.served_deployments(tmp_path, "params.yaml")
    props = rounds._parameter_openapi_schema.properties
    for name in ("wait_mode", "feedback_method", "feedback_lambda", "query_strategy", "query_k"):
        assert name in props and props[name].get("description"), name
    assert rounds.parameters["wait_mode"] == "resume"
    assert "feedback_method" not in rounds.parameters  # left empty: params.yaml decides
    props = baseline._parameter_openapi_schema.properties
    assert {"train_model", "train_lr", "train_epochs"} <= set(props)


def test_the_runner_polls_every_second_unless_told(monkeypatch):
    monkeypatch.delenv("PREFECT_RUNNER_POLL_FREQUENCY", raising=False)
    assert cli.runner_env() == {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "5")
    assert cli.runner_env() == {"PREFECT_RUNNER_POLL_FREQUENCY": "5"}


def test_mlflow_links_point_at_the_ui_that_serves_the_store(monkeypatch):
    link, text = mlflow_run_link("http://mlflow.lab:5000/", "3", "abc")
    assert link == "http://mlflow.lab:5000/#/experiments/3/runs/abc"
    assert "abc" in text and "http://mlflow.lab:5000/" in text
    monkeypatch.setenv("XBL_MLFLOW_PORT", "5123")
    link, text = mlflow_run_link("sqlite:////p/mlflow.db", "1", "def")
    assert link == "http://127.0.0.1:5123/#/experiments/1/runs/def"
    assert "MLflow run def in sqlite:////p/mlflow.db" in text and "xbl server start" in text


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Loop Oracle_2", "mlflow-candidate") == "xbl-loop-oracle-2-mlflow-candidate"
    assert artifact_key("!!!", "labelstudio") == "xbl-xbl-labelstudio"
