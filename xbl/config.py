"""The typed configuration: params.yaml, read once per run, checked, one section per step.

It knows what may be chosen: the names of the models, feedback methods, saliency maps and
query strategies, as plain names, so that reading the settings loads no torch (the webhook and
quick commands start without it). The registries that implement them import those names, or
are held to them by tests/unit/test_config.py.

Every default lives here, in the dataclasses below; the shipped params.yaml states the same
values (a test holds the two together). A key that is misspelt, of the wrong type or outside
its allowed values is an error that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import yaml

from xbl.errors import ConfigError

# ---------------------------------------------------------------- what may be chosen
# In the order the error messages list them. MODEL_NAMES and FEEDBACK_METHODS are the keys of
# the registries in xbl/train/models.py and xbl/feedback/methods.py (tests hold them equal);
# a feedback method registered elsewhere (`register`) adds its name to FEEDBACK_METHODS.
MODEL_NAMES = ("small_cnn", "resnet18", "resnet34")
# train.freeze: what is not trained. stem: the first conv (and its batchnorm); early: the stem
# and the first half of the stages after it; all_but_head: everything but the classifier head
FREEZE = ("none", "stem", "early", "all_but_head")
FEEDBACK_METHODS = ["rrr", "rrr_output", "rrr_g", "hint", "exbl", "counterexamples"]
# the per-image scores of xbl/query/sampling.py, or one query per explanation cluster
QUERY_STRATEGIES = (
    "entropy",
    "least_confidence",
    "margin",
    "random",
    "confident_mistakes",
    "cluster",
)
SALIENCY_METHODS = ("deeplift", "gradcam")
K_SELECTION = ("eigengap", "silhouette")  # how the number of explanation clusters is chosen


def _choices(*allowed: str) -> dict:
    return {"choices": allowed}


class _Section:
    """A params.yaml section, checked whenever it is built (from the file or in code)."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                _allowed(
                    f"{self.name}.{_yaml_key(f)}", getattr(self, f.name), f.metadata["choices"]
                )
        self.check()

    def check(self) -> None:
        """Checks beyond the field types and choices; a ConfigError names the key."""


@dataclass(frozen=True)
class DataConfig(_Section):
    name = "data"
    dataset: str = "decoy-digits"  # built-in (or decoy-lesions); a manifest CSV; a dataset folder
    image_size: int = 28
    channels: str | int = "auto"  # auto: 3 if any image is in colour, else 1
    digit_size: int = 20
    decoy_size: int = 4
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2})
    seed: int = 0
    out: str = "data/prepared"

    def check(self) -> None:
        _positive("data.image_size", self.image_size)
        if self.dataset == "decoy-lesions" and self.image_size < 32:
            raise ConfigError(
                f"data.image_size is {self.image_size}; decoy-lesions needs at least 32 (try 64)"
            )
        if (
            self.dataset == "decoy-digits"
            and self.image_size - self.digit_size < 2 * self.decoy_size
        ):
            raise ConfigError(
                f"data.image_size ({self.image_size}) − data.digit_size ({self.digit_size}) is "
                f"under 2 × data.decoy_size ({self.decoy_size}): no room for a decoy in a corner"
            )
        if self.channels not in ("auto", 1, 3):
            raise ConfigError(f"data.channels is {self.channels!r}; allowed: auto, 1 or 3")
        self._check_out()
        if sorted(self.split) != ["test", "train", "val"]:
            raise ConfigError(
                f"data.split has keys {sorted(self.split)}; expected exactly train, val and test"
            )
        if abs(sum(self.split.values()) - 1.0) > 1e-6 or min(self.split.values()) < 0:
            raise ConfigError(
                f"data.split is {self.split}; the fractions must be non-negative and sum to 1"
            )

    def _check_out(self) -> None:
        """Prepare replaces data.out whole: it may not be, or hold, the user's images or the
        annotators' masks (`data.out: data` once deleted data/raw and data/feedback)."""
        out = PurePosixPath(os.path.normpath(self.out.replace("\\", "/")))
        kept = [PurePosixPath(p) for p in ("data/raw", "data/feedback", "data/rounds")]
        if str(out) in ("", ".") or (not out.is_absolute() and ".." in out.parts):
            raise ConfigError(
                f"data.out is {self.out!r}; it must be a folder of its own inside the project, "
                "such as data/prepared"
            )
        clash = [str(k) for k in kept if out == k or out in k.parents or k in out.parents]
        if clash:
            raise ConfigError(
                f"data.out is {self.out!r}, which is or holds {', '.join(clash)}: prepare "
                "replaces that folder whole; use a folder of its own, such as data/prepared"
            )


@dataclass(frozen=True)
class TrainConfig(_Section):
    name = "train"
    model: str = "small_cnn"
    pretrained: str | None = None  # a local state dict to start from (e.g. ImageNet weights)
    freeze: str = field(default="none", metadata=_choices(*FREEZE))
    lr: float = 0.001
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    patience: int = 5  # 0: no early stopping, keep the last epoch's weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = 1  # > 1: data-parallel under torchrun
    amp: bool = False  # autocast the CE forward: CUDA float16, CPU bfloat16
    loader_workers: int = 0  # processes reading images from disk (0: the training process)

    def check(self) -> None:
        _allowed("train.model", self.model, MODEL_NAMES)
        if self.pretrained is not None and not self.pretrained.strip():
            raise ConfigError("train.pretrained is ''; allowed: a state dict's path, or null")
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.devices", self.devices)
        _positive("train.lr", self.lr)
        if self.loader_workers < 0:
            raise ConfigError(f"train.loader_workers is {self.loader_workers}; allowed: 0 or more")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device is {self.device!r}; allowed: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class MlflowConfig(_Section):
    name = "mlflow"
    experiment: str = "xbl"
    model_name: str = "xbl-classifier"


@dataclass(frozen=True)
class QueryConfig(_Section):
    name = "query"
    model: str = field(default="champion", metadata=_choices("champion", "latest"))
    strategy: str = field(default="entropy", metadata=_choices(*QUERY_STRATEGIES))
    k: int = 25
    saliency: str = field(default="deeplift", metadata=_choices(*SALIENCY_METHODS))
    blur_sigma: float = 3.0
    grid_cell: int = 4  # pixels per cell side (of the prepared image)
    grid: int | None = None  # cells per side instead: grid_cell follows data.image_size
    top_cells: int = 8
    seed: int = 0  # the random strategy's seed (plus the round number)
    # strategy cluster: the candidates clustered (top-M by entropy; None: every candidate), the
    # largest number of clusters, and how their number is chosen
    cluster_pool: int | None = None
    clusters_max: int = 10
    cluster_selection: str = field(default="eigengap", metadata=_choices(*K_SELECTION))
    # carrying a cluster answer to the members (the cluster benchmark of 2026-12-03 chose both
    # on audit): the concept strength that makes a member's pixel "ignore", and the confidence
    # a member's mask needs to train without review; members shown per cluster task in its
    # montage
    propagation_threshold: float = 0.8
    review_confidence: float = 0.5
    montage_members: int = 16

    def check(self) -> None:
        _positive("query.k", self.k)
        _positive("query.clusters_max", self.clusters_max)
        _positive("query.montage_members", self.montage_members)
        for key in ("propagation_threshold", "review_confidence"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(
                    f"query.{key} is {getattr(self, key)}; allowed: a number in [0, 1]"
                )
        if self.cluster_pool is not None:
            _positive("query.cluster_pool", self.cluster_pool)
        _positive("query.grid_cell", self.grid_cell)
        if self.grid is not None:
            _positive("query.grid", self.grid)
        _positive("query.top_cells", self.top_cells)


@dataclass(frozen=True)
class LabelStudioConfig(_Section):
    name = "labelstudio"
    project_prefix: str = "xbl"
    annotator: str = field(default="oracle", metadata=_choices("oracle", "human"))
    oracle_overlap: float = 0.1
    # the oracle's answer on a cluster task that marked something: all members (confident
    # masks train, doubtful ones go to review) | review (every member's mask is reviewed)
    oracle_scope: str = field(default="all", metadata=_choices("all", "review"))
    # the oracle's modelled seconds per action, recorded as its lead time (docs/methods.md,
    # "Annotation cost"): open and read a task, relabel a region, scan a cluster's montage and
    # choose, review one carried mask
    oracle_task_s: float = 8.0
    oracle_region_s: float = 2.0
    oracle_montage_s: float = 10.0
    oracle_review_s: float = 3.0

    def check(self) -> None:
        if not 0 <= self.oracle_overlap <= 1:
            raise ConfigError(
                f"labelstudio.oracle_overlap is {self.oracle_overlap}; "
                "allowed: a fraction in [0, 1]"
            )
        for key in ("oracle_task_s", "oracle_region_s", "oracle_montage_s", "oracle_review_s"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"labelstudio.{key} is {getattr(self, key)}; allowed: 0 or more seconds"
                )

    def oracle_time_model(self) -> dict[str, float]:
        """Seconds per action of the simulated annotator, as `oracle_seconds` takes them."""
        return {
            "task": self.oracle_task_s,
            "region": self.oracle_region_s,
            "montage": self.oracle_montage_s,
            "review": self.oracle_review_s,
        }


@dataclass(frozen=True)
class WaitConfig(_Section):
    name = "wait"
    mode: str = field(default="block", metadata=_choices("block", "resume"))
    target_fraction: float = 1.0
    min_annotated: int = 5
    timeout_s: float = 900.0
    poll_s: float = 3.0

    def check(self) -> None:
        _positive("wait.timeout_s", self.timeout_s)
        _positive("wait.poll_s", self.poll_s)
        if self.min_annotated < 0:
            raise ConfigError(f"wait.min_annotated is {self.min_annotated}; allowed: 0 or more")
        if not 0 < self.target_fraction <= 1:
            raise ConfigError(
                f"wait.target_fraction is {self.target_fraction}; allowed: a fraction in (0, 1]"
            )


@dataclass(frozen=True)
class FeedbackConfig(_Section):
    name = "feedback"
    method: str = "rrr_output"
    lambda_: dict[str, float] = field(default_factory=dict, metadata={"key": "lambda"})
    normalize_lambda: bool = False
    init: str = field(default="scratch", metadata=_choices("scratch", "warm"))
    epochs: int = 20
    lr: float = 0.001
    # 6 annotated images on every 4th step (the term weighted 4·16/6 λ): the cheapest schedule
    # whose audit recovery held at 2, 10 and 100 % annotated (bench/results/cost.md)
    per_batch: int = 6
    every: int = 4
    exbl_margin: float = 1.0
    counterexample_copies: int = 3

    def check(self) -> None:
        _allowed("feedback.method", self.method, tuple(FEEDBACK_METHODS))
        for name, weight in self.lambda_.items():
            _allowed("feedback.lambda", name, tuple(FEEDBACK_METHODS))
            if weight < 0:  # a negative weight would reward the very reasons annotators refused
                raise ConfigError(f"feedback.lambda.{name} is {weight}; allowed: 0 or more")
        _positive("feedback.per_batch", self.per_batch)
        _positive("feedback.every", self.every)
        _positive("feedback.epochs", self.epochs)
        _positive("feedback.lr", self.lr)


@dataclass(frozen=True)
class PromotionConfig(_Section):
    name = "promotion"
    level: float = 0.05  # the paired test's level: a candidate must be better with p below it
    val_veto: bool = False  # veto a candidate whose val accuracy drops more than the next
    max_val_acc_drop: float = 0.02

    def check(self) -> None:
        if not 0 < self.level < 1 or not 0 <= self.max_val_acc_drop <= 1:
            raise ConfigError(
                f"promotion: level is {self.level} and max_val_acc_drop {self.max_val_acc_drop}; "
                "allowed: a level in (0, 1) and a drop in [0, 1]"
            )


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    name = "schedule"
    cron: str | None = "0 * * * *"
    interval_s: float | None = None  # takes precedence over cron when set

    def check(self) -> None:
        if self.cron is None and self.interval_s is None:
            raise ConfigError("schedule.cron and schedule.interval_s are both unset; set one")
        if self.interval_s is not None:
            _positive("schedule.interval_s", self.interval_s)


@dataclass(frozen=True)
class WebhookConfig(_Section):
    name = "webhook"
    # header: a signed request, or Label Studio's static header token (it cannot sign);
    # signature: signed requests only (HMAC-SHA256 over timestamp and body)
    auth: str = field(default="header", metadata=_choices("header", "signature"))
    signature_window_s: float = 300.0  # a signed request's timestamp is this close to the clock
    retention_days: float = 7.0  # delivery records older than this are deleted

    def check(self) -> None:
        _positive("webhook.signature_window_s", self.signature_window_s)
        _positive("webhook.retention_days", self.retention_days)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    labelstudio: LabelStudioConfig = field(default_factory=LabelStudioConfig)
    wait: WaitConfig = field(default_factory=WaitConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)


# ---------------------------------------------------------------- reading and checking
def _allowed(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} is {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} is {value!r}; allowed: a number above 0")


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """`value` as type `kind` (int for float is fine; bool for int is not)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds[:-1]:  # e.g. `auto | 1 | 3`: the first type that fits
            try:
                return _coerce(key, value, kind)
            except ConfigError:
                pass
        return _coerce(key, value, kinds[-1])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is {value!r}; allowed: a mapping")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{key} is {value!r}; allowed: a {kind.__name__}")
    return float(value) if kind is float else value


def _section(cls: type, name: str, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name} is {values!r}; allowed: a mapping of settings")
    hints = typing.get_type_hints(cls)
    by_key = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]} is not a setting; allowed: {', '.join(by_key)}")
    return cls(
        **{
            f.name: _coerce(f"{name}.{key}", values[key], hints[f.name])
            for key, f in by_key.items()
            if key in values
        }
    )


def build_config(params: dict) -> Config:
    """A checked Config from params as read from YAML (sections may be left out)."""
    if not isinstance(params, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(params).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a section; allowed: {', '.join(hints)}")
    cfg = Config(**{name: _section(hints[name], name, params.get(name)) for name in hints})
    return _grid_from_cells_per_side(cfg)


def _grid_from_cells_per_side(cfg: Config) -> Config:
    """With query.grid set, the cell side in pixels that gives that many cells per side (the
    last row and column may be narrower when the size does not divide)."""
    grid, size = cfg.query.grid, cfg.data.image_size
    if grid is None:
        return cfg
    if grid > size:
        raise ConfigError(f"query.grid is {grid} cells per side, more than image_size {size} px")
    return dataclasses.replace(
        cfg, query=dataclasses.replace(cfg.query, grid_cell=-(-size // grid))
    )


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with dotted settings replaced, as a flow parameter or a command option gives them:
    {"feedback.method": "rrr", "query.k": 10}, or one entry of a mapping, "feedback.lambda.rrr".
    Each touched section is rebuilt through the file's own path, so a bad value is refused with
    the ConfigError params.yaml would give (None values are skipped: no override)."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        name, _, key = dotted.partition(".")
        section = _overridden_section(cfg, name)
        values = by_section.setdefault(name, as_params(section))
        key, _, entry = key.partition(".")
        if entry:
            if not isinstance(values.get(key), dict):
                raise ConfigError(f"{dotted} is not a setting; {name}.{key} is not a mapping")
            value = {**values[key], entry: value}
        values[key] = value
    if not by_section:
        return cfg
    hints = typing.get_type_hints(Config)
    rebuilt = {name: _section(hints[name], name, values) for name, values in by_section.items()}
    return _grid_from_cells_per_side(dataclasses.replace(cfg, **rebuilt))


def _overridden_section(cfg: Config, name: str) -> Any:
    hints = typing.get_type_hints(Config)
    if name not in hints:
        raise ConfigError(f"{name} is not a section; allowed: {', '.join(hints)}")
    return getattr(cfg, name)


def project_title(cfg: Config) -> str:
    """The Label Studio project of the experiment's rounds."""
    return f"{cfg.labelstudio.project_prefix}-{cfg.mlflow.experiment}"


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and check params.yaml; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    try:
        return build_config(params)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def fingerprint(section: Any, ignore: tuple[str, ...] = ()) -> str:
    """A short hash of a section's settings (except `ignore`): runs made with the same
    settings share it, so a stored model can be matched to the settings that would remake it."""
    values = {k: v for k, v in as_params(section).items() if k not in ignore}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def as_params(section: Any) -> dict:
    """A section as the nested dict params.yaml spells it (for logging to MLflow)."""
    return {_yaml_key(f): getattr(section, f.name) for f in dataclasses.fields(section)}
