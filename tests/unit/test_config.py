"""The typed configuration: one place for defaults, errors that name the key."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from xbl.config import (
    Config,
    ConfigError,
    FeedbackConfig,
    TrainConfig,
    as_params,
    build_config,
    load_config,
)
from xbl.feedback.methods import METHODS

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_state_exactly_the_code_defaults():
    """No code default disagrees with params.yaml: the two are one configuration."""
    assert load_config(REPO / "params.yaml") == Config()


def test_every_setting_in_the_code_appears_in_params_yaml():
    """A user reads params.yaml to see what can be set: nothing is hidden in the code."""
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in dataclasses.fields(Config):
        names = set(as_params(getattr(Config(), section.name)))
        assert names == set(shipped[section.name]), section.name


def test_new_model_and_data_settings_default_to_what_xbl_did_before():
    """SmallCNN from the seed, nothing frozen, channels decided by the images."""
    train, data = Config().train, Config().data
    assert (train.model, train.pretrained, train.freeze) == ("small_cnn", None, "none")
    assert data.channels == "auto"
    cfg = build_config({"data": {"channels": 3}, "train": {"model": "resnet34", "freeze": "early"}})
    assert (cfg.data.channels, cfg.train.model, cfg.train.freeze) == (3, "resnet34", "early")
    assert build_config({"data": {"channels": "auto"}}).data.channels == "auto"
    assert build_config({"data": {"channels": 1}}).data.channels == 1
    with pytest.raises(ConfigError, match="data.channels is 'rgb'; allowed: auto, 1 or 3"):
        build_config({"data": {"channels": "rgb"}})


def test_left_out_sections_and_keys_take_the_defaults():
    cfg = build_config({"train": {"epochs": 3}})
    assert cfg.train == dataclasses.replace(TrainConfig(), epochs=3)
    assert cfg.wait == Config().wait


@pytest.mark.parametrize(
    "params, named",
    [
        ({"feedback": {"method": "rrrr"}}, ["feedback.method", "'rrrr'", "rrr_output"]),
        ({"train": {"epochs": "ten"}}, ["train.epochs", "'ten'", "int"]),
        ({"train": {"amp": 1}}, ["train.amp", "1", "bool"]),
        ({"train": {"model": "vgg"}}, ["train.model", "'vgg'", "small_cnn", "resnet18"]),
        ({"train": {"freeze": "layer4"}}, ["train.freeze", "'layer4'", "stem", "all_but_head"]),
        ({"train": {"pretrained": ""}}, ["train.pretrained", "''", "null"]),
        ({"train": {"pretrained": 5}}, ["train.pretrained", "5", "str"]),
        ({"data": {"channels": 2}}, ["data.channels", "2", "auto, 1 or 3"]),
        ({"data": {"channels": 2.5}}, ["data.channels", "2.5", "int"]),
        ({"query": {"strategy": "bald"}}, ["query.strategy", "'bald'", "entropy"]),
        ({"wait": {"target_fraction": 1.5}}, ["wait.target_fraction", "1.5", "(0, 1]"]),
        ({"wait": {"min_anotated": 5}}, ["wait.min_anotated", "min_annotated"]),
        ({"feedback": {"lambda": {"rrx": 1.0}}}, ["feedback.lambda", "'rrx'", "rrr"]),
        ({"feedback": {"lambda": {"rrr": "high"}}}, ["feedback.lambda.rrr", "'high'", "float"]),
        ({"labelstudio": {"annotator": "robot"}}, ["labelstudio.annotator", "oracle", "human"]),
        ({"data": {"split": {"train": 0.9, "val": 0.2, "test": 0.2}}}, ["data.split", "sum to 1"]),
        ({"promotoin": {}}, ["promotoin", "promotion"]),
        ({"train": {"device": "gpu"}}, ["train.device", "'gpu'", "cuda:N"]),
        ({"feedback": {"lr": 0}}, ["feedback.lr", "above 0"]),
        ({"wait": {"min_annotated": -1}}, ["wait.min_annotated", "0 or more"]),
        ({"schedule": {"cron": None}}, ["schedule.cron", "schedule.interval_s"]),
        ({"data": {"image_size": 26}}, ["data.image_size (26)", "data.decoy_size (4)", "corner"]),
    ],
)
def test_a_bad_setting_names_key_value_and_what_is_allowed(params, named):
    with pytest.raises(ConfigError) as err:
        build_config(params)
    for part in named:
        assert part in str(err.value)


def test_the_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train.batch_size is 0"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")


def test_lambda_overrides_one_method_and_leaves_the_others_at_their_defaults():
    cfg = FeedbackConfig(lambda_={"rrr": 2.5})
    assert cfg.lam("rrr") == 2.5
    assert cfg.lam("rrr_output") == METHODS["rrr_output"].default_lambda
    assert as_params(cfg)["lambda"] == {"rrr": 2.5}  # spelt as in params.yaml


def _dict_gets(path: Path) -> list[str]:
    """`.get(key, default)` calls with a string key: a default repeated outside the config."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            key = node.args[0].value
            if key in _setting_names():
                found.append(f"{path.relative_to(REPO)}:{node.lineno} .get({key!r}, ...)")
    return found


def _setting_names() -> set[str]:
    names = set()
    for section in dataclasses.fields(Config):
        names |= set(as_params(getattr(Config(), section.name)))
    return names


def test_no_code_repeats_a_settings_default():
    """Settings are read from the typed config, never as `.get("epochs", 20)` on a dict."""
    found = [
        hit
        for package in ("xbl", "services", "tasks", "flows")
        for module in sorted((REPO / package).glob("*.py"))
        for hit in _dict_gets(module)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("size", "grid", "cell"), [(28, 7, 4), (64, 7, 10), (64, 8, 8), (224, 7, 32)]
)
def test_cells_per_side_set_the_cell_for_the_image_size(size, grid, cell):
    cfg = build_config({"data": {"image_size": size}, "query": {"grid": grid}})
    assert cfg.query.grid_cell == cell
    assert -(-size // cfg.query.grid_cell) == grid  # that many cells cover the image


def test_more_cells_per_side_than_pixels_is_refused():
    with pytest.raises(ConfigError, match="query.grid"):
        build_config({"data": {"image_size": 28}, "query": {"grid": 29}})
