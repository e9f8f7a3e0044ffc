"""The typed configuration: one place for defaults, errors that name the key."""

from __future__ import annotations

import ast
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

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
from xbl.feedback.schedule import method_lambda

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
    assert method_lambda(cfg, "rrr") == 2.5
    assert method_lambda(cfg, "rrr_output") == METHODS["rrr_output"].default_lambda
    assert method_lambda(cfg) == method_lambda(cfg, cfg.method)  # the chosen method's
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
        for module in sorted((REPO / package).rglob("*.py"))
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


# ---------------------------------------------------------------- the names config allows
def test_each_registry_offers_exactly_the_names_the_config_allows():
    """The config lists what may be chosen as plain names (it loads no torch); every registry
    implements exactly those, in the same order (the order error messages list them in)."""
    from xbl import config
    from xbl.query.sampling import STRATEGIES
    from xbl.train.models import MODELS

    assert tuple(MODELS) == config.MODEL_NAMES
    built_in = [name for name, cls in METHODS.items() if cls.__module__ == "xbl.feedback.methods"]
    assert built_in == config.FEEDBACK_METHODS, "list a new method's name in xbl/config.py"
    assert (*STRATEGIES, "cluster") == config.QUERY_STRATEGIES


@pytest.mark.parametrize(
    "code",
    [
        "import xbl.config",
        "from xbl.config import load_config; load_config('params.yaml')",
        "import importlib, pkgutil, webhook\n"
        "for m in pkgutil.iter_modules(webhook.__path__): importlib.import_module(f'webhook.{m.name}')",
        "from flows.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass",
        "from flows.cli import main\ntry: main(['webhook', '--help'])\nexcept SystemExit: pass",
    ],
    ids=[
        "import config",
        "load params.yaml",
        "webhook receiver",
        "xbl --help",
        "xbl webhook --help",
    ],
)
def test_reading_the_settings_loads_no_torch(code):
    """The webhook receiver and the quick commands read the settings without paying for torch
    and Captum: the config names what may be chosen instead of importing the registries."""
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- function defaults
CALLERS = ("xbl", "tasks", "flows", "services", "webhook", "infra", "bench")
# a default that differs from the setting its parameter is given, and why that is right
DIFFERENT_ON_PURPOSE = {
    "decoy_lesions.image_size": "lesions are drawn at 64 px unless told; data.image_size's 28 "
    "is decoy-digits' (params.yaml says to set 64 for decoy-lesions)",
}


@dataclasses.dataclass(frozen=True)
class _Mirror:
    """A parameter that stands for a setting: `function(param=default)` and the setting."""

    function: str
    param: str
    setting: str
    sections: tuple[str, ...]
    default: ast.expr | None
    where: str = ""

    def __str__(self) -> str:
        default = ast.unparse(self.default) if self.default is not None else ""
        return f"{self.function}({self.param}={default}) for {self.setting} {self.where}"


def _settings() -> dict[str, dict[str, Any]]:
    """Each setting's name (in the code and in params.yaml) → {section: its default}."""
    found: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(Config):
        values = getattr(Config(), section.name)
        for f in dataclasses.fields(values):
            for name in (f.name, f.metadata.get("key", f.name)):
                found.setdefault(name, {})[section.name] = getattr(values, f.name)
    return found


def _parameters(args: ast.arguments, bound: bool) -> list[tuple[str, ast.expr | None]]:
    """A def's parameters in call order, each with its default (None: it has none)."""
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    params = [(a.arg, d) for a, d in zip(positional, defaults)]
    params += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return params[1:] if bound else params


def _fields(node: ast.ClassDef) -> list[tuple[str, ast.expr | None]]:
    """A dataclass's fields in order, each with its default (`field(default=...)` too)."""
    fields = []
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and "ClassVar" not in ast.unparse(stmt.annotation):
            default = stmt.value
            if isinstance(default, ast.Call) and getattr(default.func, "id", "") == "field":
                default = next((k.value for k in default.keywords if k.arg == "default"), None)
            fields.append((stmt.target.id, default))
    return fields


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any(
        getattr(d.func if isinstance(d, ast.Call) else d, "id", None) == "dataclass"
        for d in node.decorator_list
    )


@functools.cache
def _signatures() -> dict[str, list[list[tuple[str, ast.expr | None]]]]:
    """What a call by name reaches in xbl/ (config.py, which holds the settings, apart): its
    functions and methods, and its classes (a dataclass's fields, or `__init__`'s parameters)."""
    found: dict[str, list] = {}
    for path in (REPO / "xbl").rglob("*.py"):
        if path.name == "config.py":
            continue
        tree = ast.parse(path.read_text())
        in_class = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                inits = [f for f in node.body if getattr(f, "name", "") == "__init__"]
                if _is_dataclass(node):
                    found.setdefault(node.name, []).append(_fields(node))
                for init in inits:
                    found.setdefault(node.name, []).append(_parameters(init.args, True))
            elif isinstance(node, ast.FunctionDef) and node.name != "__init__":
                static = any(getattr(d, "id", "") == "staticmethod" for d in node.decorator_list)
                bound = id(node) in in_class and not static
                found.setdefault(node.name, []).append(_parameters(node.args, bound))
    return found


def _setting_read(expr: ast.expr, settings: dict) -> tuple[str, tuple[str, ...]] | None:
    """(setting, sections) when `expr` reads a setting from a config: `cfg.per_batch`,
    `cfg.query.k`, `feedback.every`; None for anything else."""
    if not (isinstance(expr, ast.Attribute) and expr.attr in settings):
        return None
    owner = expr.value
    owner = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
    sections = settings[expr.attr]
    if owner in sections:
        return expr.attr, (owner,)
    if "cfg" in owner.lower() or "config" in owner.lower():
        return expr.attr, tuple(sections)
    return None


def _given_settings(settings: dict) -> list[_Mirror]:
    """Every parameter of xbl/ that a call passes a setting to, by keyword or by position (or
    as an element of a tuple, whose default's element it is then held to)."""
    signatures, found = _signatures(), []
    for path in (p for package in CALLERS for p in (REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        owner = {
            id(n): c.name
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for n in ast.walk(c)
        }
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
            if name == "cls":  # a classmethod building its own class
                name = owner.get(id(call))
            for params in signatures.get(name, []):
                defaults = dict(params)
                passed = [(p, a) for (p, _), a in zip(params, call.args)]
                passed += [(k.arg, k.value) for k in call.keywords if k.arg in defaults]
                for param, expr in passed:
                    parts = expr.elts if isinstance(expr, ast.Tuple) else [expr]
                    for i, part in enumerate(parts):
                        read = _setting_read(part, settings)
                        if read is None:
                            continue
                        default = defaults[param]
                        if isinstance(expr, ast.Tuple) and isinstance(default, ast.Tuple):
                            default = default.elts[i]
                        where = f"{path.relative_to(REPO)}:{call.lineno}"
                        found.append(_Mirror(name, param, *read, default, where))
    return found


def _named_after_settings(settings: dict, given: list[_Mirror]) -> list[_Mirror]:
    """The parameters named after a key of a section their function takes (is given one of
    that section's settings somewhere)."""
    takes: dict[str, set[str]] = {}
    for mirror in given:
        takes.setdefault(mirror.function, set()).update(mirror.sections)
    return [
        _Mirror(function, param, param, tuple(sorted(set(settings[param]) & sections)), default)
        for function, sections in takes.items()
        for params in _signatures()[function]
        for param, default in params
        if set(settings.get(param, ())) & sections
    ]


def _value(default: ast.expr) -> Any:
    """A default as written: a literal, or a setting's default read from the typed config."""
    from xbl import config

    if isinstance(default, ast.Attribute) and getattr(default.value, "id", "").endswith("Config"):
        return getattr(getattr(config, default.value.id), default.attr)
    if isinstance(default, ast.Tuple):
        return tuple(_value(e) for e in default.elts)
    return ast.literal_eval(default)


def test_no_function_default_disagrees_with_params_yaml():
    """A function default that stands for a setting is the setting's default.

    The rule, read from the source. A function of xbl/ *takes* a section when some call in
    the code (CALLERS) passes it one of that section's settings (an
    attribute named after a params.yaml key, read from a config: `cfg.per_batch`,
    `cfg.query.k`, `feedback.every`; by keyword, by position, or inside a tuple). Checked:
    every parameter such a call fills with a setting, whatever its name (`saliency_map`'s
    `sigma` is given `query.blur_sigma`), and every parameter named after a key of a section
    its function takes (`select_queries`'s `seed`). Such a parameter has no default, or None
    (it states no value), or the setting's default: written as `QueryConfig.blur_sigma` (the
    typed config's, which the first test holds equal to params.yaml), or as a literal of the
    same value. A key found in several sections may equal any of theirs.

    A name alone is not enough: `predict_proba`'s `batch_size` is an inference chunk, not
    train.batch_size, and no call gives it that setting. A default that differs on purpose
    is listed in DIFFERENT_ON_PURPOSE, with its reason.
    """
    settings = _settings()
    given = _given_settings(settings)
    mirrors = given + _named_after_settings(settings, given)
    once = {(m.function, m.param, m.setting): m for m in reversed(mirrors)}  # a call's place first
    wrong = [
        str(m)
        for m in once.values()
        if m.default is not None
        and f"{m.function}.{m.param}" not in DIFFERENT_ON_PURPOSE
        and _value(m.default) is not None
        and _value(m.default) not in [settings[m.setting][s] for s in m.sections]
    ]
    assert not wrong, "defaults that disagree with params.yaml:\n" + "\n".join(wrong)
    # the rule sees what it is for: the schedule's, the query's and the propagation's settings
    checked = {f"{m.function}.{m.param}" for m in mirrors}
    assert {"Feedback.per_batch", "Feedback.every", "saliency_map.sigma"} <= checked
    assert {"select_queries.seed", "cluster_explanations.k_range", "propagate.threshold"} <= checked
    assert set(DIFFERENT_ON_PURPOSE) <= checked  # an exception outlives nothing it excused


@pytest.mark.parametrize(
    "out",
    ["data", "data/", "./data", "data/raw", "data/raw/prepared", "data/feedback/x", ".", "../x"],
)
def test_data_out_may_not_be_or_hold_the_users_images_or_masks(out):
    """`data.out: data` passed the check and prepare deleted data/raw and data/feedback."""
    with pytest.raises(ConfigError, match="data.out is"):
        build_config({"data": {"out": out}})


def test_a_folder_of_its_own_is_a_fine_data_out():
    assert build_config({"data": {"out": "data/prepared-64"}}).data.out == "data/prepared-64"
