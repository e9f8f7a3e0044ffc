"""The models: ResNets defined here, pretrained weights from a local file, freezing, and the
input normalisation that travels with the weights."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xbl.data.prepared import PreparedData
from xbl.errors import ConfigError
from xbl.explain.saliency import deeplift_blurred, gradcam
from xbl.train.checkpoint import checkpoint_meta, initial_model, load_model, save_checkpoint
from xbl.train.models import (
    SmallCNN,
    build_model,
    freeze_stages,
    load_pretrained,
    load_weights,
    resnet18,
)


def tiny_data(channels: int, size: int, n: int = 6, classes: int = 2) -> PreparedData:
    rng = np.random.default_rng(0)
    return PreparedData(
        images=rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8),
        labels=np.arange(n) % classes,
        split=np.array(["train"] * n),
        relevance=np.ones((n, size, size), dtype=bool),
        confounder=np.zeros((n, size, size), dtype=bool),
        ids=np.array([f"img-{i}" for i in range(n)]),
        classes=np.array([str(k) for k in range(classes)]),
    )


def one_step(model: torch.nn.Module, data: PreparedData) -> float:
    x, y = data.tensors("train")
    model.train()
    opt = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 64)])
def test_resnet18_trains_a_step_and_gradcam_explains_its_last_block(channels, size):
    data = tiny_data(channels, size)
    model = initial_model("resnet18", data, seed=0)
    before = snapshot(model)
    assert np.isfinite(one_step(model, data))
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)
    assert not torch.equal(before["fc.weight"], model.fc.weight)
    assert model.last_conv is model.layer4[-1]
    x, _ = data.tensors("train")
    model.eval()
    cam = gradcam(model, x)
    assert cam.shape == (len(x), size, size) and torch.isfinite(cam).all()
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(len(x)))
    lift = deeplift_blurred(model, x)  # the annotators' default map: Captum on basic blocks
    assert lift.shape == (len(x), size, size) and torch.isfinite(lift).all()


def test_the_losses_can_train_through_a_resnets_gradcam():
    """create_graph=True, as RRR-G and HINT use it, in train mode (batchnorm on the batch)."""
    data = tiny_data(1, 28, n=4)
    model = build_model("resnet18", 1, 2, 28).train()
    x, _ = data.tensors("train")
    cam = gradcam(model, x, upsample=False, create_graph=True)
    assert cam.shape == (4, 4, 4)  # 28 px: the 3x3 stem keeps 28, three stride-2 stages
    cam.pow(2).sum().backward()
    assert model.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_small_inputs_get_the_small_stem_and_large_ones_imagenets():
    assert build_model("resnet18", 1, 2, 28).conv1.kernel_size == (3, 3)
    big = build_model("resnet34", 3, 2, 64)
    assert big.conv1.kernel_size == (7, 7) and len(big.layer3) == 6


def imagenet_like_file(tmp_path, classes: int = 5):
    """A torchvision-style state dict: RGB, another class count, no normalisation inside."""
    source = resnet18(in_channels=3, n_classes=classes, image_size=64)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "imagenet.pt"
    torch.save(state, path)
    return source, path


def test_pretrained_rgb_weights_fold_to_one_channel_and_get_a_new_head(tmp_path, caplog):
    source, path = imagenet_like_file(tmp_path)
    model = resnet18(in_channels=1, n_classes=2, image_size=64)
    fresh_head = model.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="xbl.train.models"):
        load_pretrained(model, path)
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(model.fc.weight, fresh_head)  # 5 classes in the file, 2 here
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.449], abs=1e-3)
    assert "summed over them" in caplog.text and "re-initialised" in caplog.text


def test_pretrained_weights_start_a_run_and_freezing_keeps_them(tmp_path):
    _, path = imagenet_like_file(tmp_path)
    data = tiny_data(3, 64, classes=3)
    model = initial_model("resnet18", data, 0, pretrained=path, freeze="all_but_head")
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    before = snapshot(model)
    one_step(model, data)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # batchnorm statistics of frozen stages too


def test_freezing_early_stages_trains_only_the_later_ones():
    data = tiny_data(1, 28)
    model = initial_model("resnet18", data, 0, freeze="early")
    before = snapshot(model)
    one_step(model, data)
    after = model.state_dict()
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2."):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert model.frozen == ("conv1", "bn1", "layer1", "layer2")


def test_pretrained_weights_that_do_not_fit_name_the_keys(tmp_path):
    torch.save(resnet18(3, 2, image_size=28).state_dict(), tmp_path / "small-stem.pt")
    with pytest.raises(ConfigError, match=r"conv1\.weight is \(64, 3, 3, 3\) in the file"):
        load_pretrained(resnet18(3, 2, image_size=64), tmp_path / "small-stem.pt")
    torch.save(SmallCNN().state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ConfigError, match=r"missing .*layer1\.0\.conv1\.weight"):
        load_pretrained(resnet18(1, 10, image_size=28), tmp_path / "cnn.pt")
    with pytest.raises(ConfigError, match="no such file"):
        load_pretrained(SmallCNN(), tmp_path / "nothere.pt")


def test_the_normalisation_is_the_first_module_and_pickles_with_the_model(tmp_path):
    """MLflow pickles the model: loaded, it predicts from [0,1] images exactly as trained."""
    _, path = imagenet_like_file(tmp_path)
    model = resnet18(in_channels=3, n_classes=2, image_size=64)
    load_pretrained(model, path)
    assert next(iter(model.children())) is model.normalize
    x = torch.rand(3, 3, 64, 64)
    loaded = pickle.loads(pickle.dumps(model)).eval()
    assert torch.equal(loaded(x), model.eval()(x))
    assert torch.equal(loaded.normalize.std, model.normalize.std)


def test_a_checkpoint_reloads_a_resnet_with_its_normalisation(tmp_path):
    data = tiny_data(3, 64)
    model = initial_model("resnet18", data, 0)
    model.normalize.mean.fill_(0.3)
    one_step(model, data)
    ckpt = save_checkpoint(model, tmp_path / "m.pt", checkpoint_meta("resnet18", data))
    loaded, meta = load_model(ckpt)
    x, _ = data.tensors("train")
    assert meta["model"] == "resnet18"
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert float(loaded.normalize.mean[0, 0]) == pytest.approx(0.3)


def test_small_cnn_is_unchanged_by_its_identity_normalisation():
    """Today's default: SmallCNN computes what it computed before normalisation moved inside,
    and a checkpoint from before (no normalize buffers) still loads."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(2, 1, 28, 28)
    bare = model.head(model.pool(model.features(x)))
    assert torch.equal(model(x), bare)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    again = SmallCNN()
    load_weights(again, old)
    assert torch.equal(again.eval()(x), bare)


def test_freeze_names_what_is_allowed():
    with pytest.raises(ConfigError, match="train.freeze is 'layer4'; allowed: none, stem"):
        freeze_stages(SmallCNN(), "layer4")
