"""Settings overridden for one run (a flow parameter, a command option): checked as the file's."""

from __future__ import annotations

import pytest

from xbl.config import Config, ConfigError, build_config, with_overrides


def test_an_override_replaces_that_setting_and_nothing_else():
    cfg = build_config({"feedback": {"lambda": {"hint": 3.0}}})
    varied = with_overrides(
        cfg,
        {
            "feedback.method": "rrr",
            "feedback.lambda.rrr": 2,
            "query.strategy": "margin",
            "query.k": 10,
            "wait.mode": "resume",
        },
    )
    assert varied.feedback.method == "rrr"
    assert varied.feedback.lambda_ == {"hint": 3.0, "rrr": 2.0}  # one entry; 2 read as a float
    assert (varied.query.strategy, varied.query.k, varied.wait.mode) == ("margin", 10, "resume")
    assert varied.train == cfg.train and varied.data == cfg.data
    assert varied.query.saliency == cfg.query.saliency  # the section's other keys stay


def test_no_override_is_the_config_itself():
    cfg = Config()
    assert with_overrides(cfg, {}) is cfg
    assert with_overrides(cfg, {"query.k": None, "feedback.method": None}) is cfg


def test_cells_per_side_still_follow_the_image_size():
    cfg = build_config({"data": {"image_size": 64}, "query": {"grid": 8}})
    assert with_overrides(cfg, {"query.k": 3}).query.grid_cell == 8
    assert with_overrides(cfg, {"query.grid": 4}).query.grid_cell == 16


@pytest.mark.parametrize(
    ("overrides", "params"),
    [
        ({"feedback.method": "rrrr"}, {"feedback": {"method": "rrrr"}}),
        ({"query.strategy": "entropyy"}, {"query": {"strategy": "entropyy"}}),
        ({"query.k": 0}, {"query": {"k": 0}}),
        ({"query.k": "ten"}, {"query": {"k": "ten"}}),
        ({"wait.mode": "later"}, {"wait": {"mode": "later"}}),
        ({"feedback.lambda.nope": 1.0}, {"feedback": {"lambda": {"nope": 1.0}}}),
        ({"feedback.lambda.rrr": "big"}, {"feedback": {"lambda": {"rrr": "big"}}}),
        ({"query.kk": 3}, {"query": {"kk": 3}}),
        ({"qurey.k": 3}, {"qurey": {"k": 3}}),
        ({"train.lr": 0}, {"train": {"lr": 0}}),
        ({"feedback.lambda.rrr": -1.0}, {"feedback": {"lambda": {"rrr": -1.0}}}),
    ],
)
def test_a_bad_override_is_refused_with_the_files_own_message(overrides, params):
    with pytest.raises(ConfigError) as from_file:
        build_config(params)
    with pytest.raises(ConfigError) as overridden:
        with_overrides(Config(), overrides)
    assert str(overridden.value) == str(from_file.value)


def test_an_entry_of_a_setting_that_is_no_mapping_is_named():
    with pytest.raises(ConfigError, match=r"query.k.x is not a setting; query.k is not a mapping"):
        with_overrides(Config(), {"query.k.x": 1})
