"""Classifiers. Every model starts with its input normalisation (`normalize`, buffers saved with
the weights, so a model loaded from MLflow takes [0,1] images as training gave them) and exposes
`last_conv`, the layer GradCAM explains.

The ResNets are torchvision's (basic blocks, the same parameter names, so a torchvision state
dict loads), written here so torchvision stays optional. Below 64 px their stem is a 3x3
convolution without max-pool (as for CIFAR): the ImageNet stem (7x7, stride 2, max-pool) would
shrink a 28 px image to 1 px by the last stage; there, the last block's map is 4x4.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from xbl.config import FREEZE
from xbl.errors import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_STEM_BELOW = 64  # image sizes below this get the ResNets' 3x3 stem without max-pool


class Normalize(nn.Module):
    """(x - mean) / std per channel; the statistics are buffers, saved and pickled with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """What every model declares: its stages, first to last (the first is the stem, the last the
    head), and the names of its first convolution and of its classifier layer."""

    stages: ClassVar[tuple[tuple[str, ...], ...]]
    first_conv: ClassVar[str]
    classifier: ClassVar[str]
    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> Classifier:
        """Frozen stages stay in eval mode: their batchnorm statistics are frozen too."""
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self


class SmallCNN(Classifier):
    """Two conv blocks and a linear head: seconds per epoch on a CPU for 28x28 inputs."""

    stages = (("features.0",), ("features.3",), ("head",))
    first_conv, classifier = "features.0", "head.3"

    def __init__(self, in_channels: int = 1, n_classes: int = 10, image_size: int = 28):
        super().__init__()
        # identity: SmallCNN has always seen [0,1] inputs as they are
        self.normalize = Normalize((0.0,) * in_channels, (1.0,) * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.last_conv = self.features[3]
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(self.normalize(x))))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut. Each ReLU is its own module: Captum's DeepLIFT
    needs every nonlinearity to be used once."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class ResNet(Classifier):
    """ResNet with basic blocks; GradCAM explains the last block (its output, after the ReLU).

    Inputs are normalised with mean 0.5 and std 0.5 per channel when trained from scratch (the
    batchnorm after the stem makes the choice matter little); `load_pretrained` sets ImageNet's.
    """

    stages = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",), ("fc",))
    first_conv, classifier = "conv1", "fc"

    def __init__(
        self,
        layers: Sequence[int],
        in_channels: int = 3,
        n_classes: int = 10,
        image_size: int = 224,
    ):
        super().__init__()
        self.normalize = Normalize((0.5,) * in_channels, (0.5,) * in_channels)
        if image_size < SMALL_STEM_BELOW:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        widths, inplanes = (64, 128, 256, 512), 64
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def last_conv(self) -> nn.Module:
        # a property, not a second registration: the state dict keeps torchvision's keys
        return self.layer4[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_channels: int = 3, n_classes: int = 10, image_size: int = 224) -> ResNet:
    return ResNet((2, 2, 2, 2), in_channels, n_classes, image_size)


def resnet34(in_channels: int = 3, n_classes: int = 10, image_size: int = 224) -> ResNet:
    return ResNet((3, 4, 6, 3), in_channels, n_classes, image_size)


MODELS = {"small_cnn": SmallCNN, "resnet18": resnet18, "resnet34": resnet34}


def build_model(name: str, in_channels: int, n_classes: int, image_size: int) -> Classifier:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, n_classes=n_classes, image_size=image_size)


# ---------------------------------------------------------------- weights from elsewhere
def load_weights(model: nn.Module, state: dict) -> None:
    """A checkpoint's state dict, strictly. One written before the normalisation lived in the
    model (no `normalize.*`) keeps the model's own: identity for SmallCNN, as it was trained."""
    own = model.state_dict()
    old = {k: own[k] for k in ("normalize.mean", "normalize.std") if k in own and k not in state}
    model.load_state_dict({**state, **old})


def freeze_stages(model: Classifier, level: str) -> tuple[str, ...]:
    """Stop training the stages `level` names (train.freeze); returns their module names."""
    if level not in FREEZE:
        raise ConfigError(f"train.freeze is {level!r}; allowed: {', '.join(FREEZE)}")
    stages = model.stages
    middle = stages[1:-1]
    frozen = {
        "none": (),
        "stem": stages[:1],
        "early": stages[:1] + middle[: len(middle) // 2],
        "all_but_head": stages[:-1],
    }[level]
    names = tuple(name for stage in frozen for name in stage)
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    model.frozen = names
    model.train(model.training)
    return names


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"train.pretrained is {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"train.pretrained {path}: not a readable state dict ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an xbl (or Lightning) checkpoint
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"train.pretrained {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP


def load_pretrained(model: Classifier, path: str | Path) -> list[str]:
    """A local state dict (e.g. ImageNet weights) as the starting point; returns what it adapted.

    - A first convolution trained on 3 channels, for 1-channel data: its weights are summed over
      the channel axis (a grey image repeated on R, G and B gives the same response).
    - A classifier head for another number of classes keeps its fresh initialisation.
    - A file without `normalize.*` is taken to be ImageNet-trained: ImageNet's mean and std
      (their means for 1 channel). With its own statistics, those are used.
    Every other missing, unexpected or misshapen key is an error that names them.
    """
    path = Path(path)
    state, own, notes = _read_state_dict(path), model.state_dict(), []
    stem = f"{model.first_conv}.weight"
    folds = stem in state and state[stem].ndim == 4 and state[stem].shape[1] == 3
    if folds and own[stem].shape[1] == 1:
        state[stem] = state[stem].sum(dim=1, keepdim=True)
        notes.append(f"{stem}: trained on 3 channels, summed over them for 1-channel data")
    head = f"{model.classifier}.weight"
    if head in state and state[head].shape[1:] == own[head].shape[1:]:
        theirs, ours = state[head].shape[0], own[head].shape[0]
        if theirs != ours:
            for key in (head, f"{model.classifier}.bias"):
                state[key] = own[key]
            notes.append(
                f"{model.classifier}: {theirs} classes in the file, {ours} here: re-initialised"
            )
    channels = own["normalize.mean"].shape[1]
    if "normalize.mean" not in state:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        state["normalize.mean"], state["normalize.std"] = (
            (t if channels == 3 else t.mean(dim=0, keepdim=True)).view(1, -1, 1, 1)
            for t in (mean, std)
        )
        notes.append("normalize: ImageNet mean and std (the file has no statistics of its own)")
    elif state["normalize.mean"].shape[1] == 3 and channels == 1:
        for key in ("normalize.mean", "normalize.std"):
            state[key] = state[key].mean(dim=1, keepdim=True)
    for key in own:  # files older than torch 0.4.1 have no batchnorm step counts
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, own[key])
    _check_fit(model, path, state, own)
    model.load_state_dict(state)
    for note in notes:
        log.warning("train.pretrained %s: %s", path, note)
    return notes


def _check_fit(model: Classifier, path: Path, state: dict, own: dict) -> None:
    """Every key present, none extra, every shape equal; else one error naming them all."""
    problems = []
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"not in the model {', '.join(extra)}")
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems += shapes
    if problems:
        raise ConfigError(
            f"train.pretrained {path} does not fit {type(model).__name__} "
            f"({len(own)} tensors): " + "; ".join(problems)
        )
