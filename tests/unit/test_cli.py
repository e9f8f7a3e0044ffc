"""The `xbl` command line: the webhook receiver gets its own options untouched, and a bad
setting is one line before anything starts."""

from __future__ import annotations

import pytest

from flows.cli import main
from xbl.errors import ConfigError


def test_webhook_options_reach_the_receiver(capsys):
    with pytest.raises(SystemExit) as done:
        main(["webhook", "--help"])
    assert done.value.code == 0
    assert "--target-fraction" in capsys.readouterr().out


def test_webhook_without_a_secret_refuses_to_start(monkeypatch):
    monkeypatch.delenv("XBL_WEBHOOK_SECRET", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["webhook", "--port", "9", "--state-dir", "unused"])
    assert "XBL_WEBHOOK_SECRET" in str(done.value.code)  # sys.exit(message): status 1


def test_webhook_target_defaults_to_the_projects_wait_target(tmp_path, monkeypatch):
    from webhook import server

    served = []
    monkeypatch.setattr(
        server, "run_receiver", lambda receiver, host, port, what: served.append(receiver) or 0
    )
    monkeypatch.setenv("XBL_WEBHOOK_SECRET", "s" * 32)
    (tmp_path / "params.yaml").write_text("wait:\n  target_fraction: 0.4\n")
    monkeypatch.delenv("XBL_WEBHOOK_TARGET_FRACTION", raising=False)
    start = [
        "--project",
        str(tmp_path),
        "webhook",
        "--port",
        "9",
        "--state-dir",
        str(tmp_path / "state"),
    ]

    assert main(start) == 0
    assert served[-1].target_fraction == 0.4  # xbl pointed it at the project
    served[-1].store.close()
    monkeypatch.setenv("XBL_WEBHOOK_TARGET_FRACTION", "0.9")
    assert main(start) == 0
    assert served[-1].target_fraction == 0.9  # the environment wins
    served[-1].store.close()


@pytest.mark.parametrize("command", ["baseline", "demo", "round"])
def test_a_misspelt_setting_stops_before_anything_starts(tmp_path, capsys, command):
    (tmp_path / "params.yaml").write_text("train:\n  epocs: 3\n")
    assert main(["--project", str(tmp_path), command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line, no traceback
    assert "train.epocs is not a setting" in err and "epochs" in err
    assert not (tmp_path / ".labelstudio").exists() and not (tmp_path / "mlflow.db").exists()


def test_webhook_help_works_whatever_the_settings(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("wait:\n  target_fraction: 7\n")
    with pytest.raises(SystemExit) as done:
        main(["--project", str(tmp_path), "webhook", "--help"])
    assert done.value.code == 0


def test_a_demo_project_takes_the_repository_settings_with_its_profile(tmp_path, monkeypatch):
    import yaml

    from flows import cli
    from xbl.config import load_config

    demos = tmp_path / "demos"
    demos.mkdir()
    (demos / "lesions.yaml").write_text(
        yaml.safe_dump(
            {"data": {"dataset": "decoy-lesions", "image_size": 64}, "query": {"grid": 8}}
        )
    )
    monkeypatch.setattr(cli, "DEMOS", demos)
    root = cli.demo_project("lesions")
    cfg = load_config(root / "params.yaml")
    repo = load_config(cli.REPO / "params.yaml")
    assert (cfg.data.dataset, cfg.data.image_size, cfg.query.grid_cell) == ("decoy-lesions", 64, 8)
    assert cfg.data.split == repo.data.split and cfg.train == repo.train  # the rest unchanged
    assert (root / "xbl" / "data" / "prepare.py").is_file() and (root / "dvc.yaml").is_file()
    assert (root / ".git").is_dir()
    assert cli.demo_project("lesions") == root  # a second call reuses it
    with pytest.raises(ConfigError, match="available: lesions"):
        cli.demo_project("nothing")
