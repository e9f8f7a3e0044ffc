"""Data-parallel training: two CPU processes under torchrun (gloo) train the same model as one
process does on the same global batches, with and without feedback; failures surface."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.digits import decoy_digits
from xbl.data.prepared import PreparedData
from xbl.feedback.methods import METHODS
from xbl.feedback.schedule import build_feedback
from xbl.train.checkpoint import initial_model, load_checkpoint, save_checkpoint
from xbl.train.distributed import launch
from xbl.train.fit import fit
from xbl.train.loop import FeedbackDiverged, training_loop
from xbl.train.models import build_model

pytestmark = pytest.mark.timeout(120)

CFG = TrainConfig(epochs=3, batch_size=32, seed=3, patience=2, lr=1e-3, device="cpu")
# Measured max |weight difference|: 1.4e-6 (plain, 3 epochs), 4.2e-7 (rrr, 2 epochs). The runs
# differ only in float summation order (gradients summed per half, then averaged), which Adam
# carries forward; 1e-4 leaves a wide margin yet is far below one Adam step (lr 1e-3).
WEIGHT_TOL = 1e-4
LAUNCH_TIMEOUT_S = 90  # a hang becomes the launcher's RuntimeError, not a stuck test


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Every fourth decoy digit: 256 training and 103 validation images."""
    full = decoy_digits()
    data = full.take(np.arange(0, len(full), 4))
    path = tmp_path_factory.mktemp("ddp-data") / "prepared"
    data.save(path)
    return path


def _feedback(data: PreparedData, method: str = "rrr", lam: float = 1.0, model=None):
    """The decoy patch of 24 training images marked as 'ignore', 8 mixed into every batch; the
    centre cells kept as evidence on all but every third image (which kept nothing, so HINT's
    slices hold uneven numbers of images with an M)."""
    idx = data.indices("train")[:24]
    keep = np.zeros((len(idx), 28, 28), bool)
    keep[:, 8:20, 8:20] = True
    keep[::3] = False
    cfg = FeedbackConfig(method=method, lambda_={method: lam}, per_batch=8, normalize_lambda=True)
    W = data.confounder[idx]
    return build_feedback(cfg, data, idx, W, seed=0, model=model, keep=keep)


def _train_one_process(
    data: PreparedData, cfg: TrainConfig, init: Path | None = None, feedback=None
):
    """What `fit` does in one process: seeded initial weights (or init's), then train."""
    model = initial_model(cfg.model, data, cfg.seed, init)
    result = training_loop(model, data.tensors("train"), data.tensors("val"), cfg, feedback)
    return model, result


def _max_weight_diff(model, checkpoint: Path) -> float:
    state = load_checkpoint(checkpoint)[0]
    return max((state[k] - v).abs().max().item() for k, v in model.state_dict().items())


def test_two_processes_train_the_single_process_model(dataset, tmp_path):
    data = PreparedData.load(dataset)
    model, ref = _train_one_process(data, CFG)
    rows = []
    out = launch(
        2,
        dataset,
        CFG,
        tmp_path / "ddp.pt",
        workdir=tmp_path / "work",
        timeout_s=LAUNCH_TIMEOUT_S,
        on_epoch=rows.append,
    )
    assert out.world_size == 2 and out.device == "cpu"
    assert out.checkpoint == str(tmp_path / "ddp.pt")
    assert _max_weight_diff(model, tmp_path / "ddp.pt") < WEIGHT_TOL
    assert out.best_epoch == ref.best_epoch
    assert out.min_val_loss == pytest.approx(ref.min_val_loss, abs=1e-5)
    assert rows == out.history  # streamed to the caller while training ran
    assert [r["val_loss"] for r in rows] == pytest.approx(
        [r["val_loss"] for r in ref.history], abs=1e-5
    )
    assert out.effective_lambda is None


def test_feedback_under_two_processes_matches_one(dataset, tmp_path):
    """RRR fine-tuning from a checkpoint, λ normalised on the first batch: the annotated
    images are split across the processes too, and λ comes from whole-batch values."""
    data = PreparedData.load(dataset)
    base, _ = _train_one_process(data, replace(CFG, epochs=1))
    init = save_checkpoint(base, tmp_path / "base.pt", {})
    feedback = _feedback(data)
    cfg = replace(CFG, epochs=2, patience=0)
    model, ref = _train_one_process(data, cfg, init, feedback)
    out = launch(
        2,
        data,
        cfg,
        tmp_path / "ddp.pt",
        init=str(init),
        feedback=feedback,
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    assert _max_weight_diff(model, tmp_path / "ddp.pt") < WEIGHT_TOL
    assert out.effective_lambda == pytest.approx(ref.effective_lambda, rel=1e-5)
    assert out.effective_lambda != feedback.lam  # normalised, not the λ as given
    assert [r["train_feedback"] for r in out.history] == pytest.approx(
        [r["train_feedback"] for r in ref.history], rel=1e-4
    )


@pytest.mark.parametrize("method", [*METHODS, "exbl-batch-exemplars"])
def test_feedback_shares_add_up_to_the_whole_term(dataset, method):
    """Split 3 ways (7 images: uneven slices), the shares and their gradients sum to the term
    on the whole batch, for every method: what DDP's gradient average relies on."""
    data = PreparedData.load(dataset)
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, len(data.classes), 28)
    fb = _feedback(data, method.split("-")[0], model=model)
    if method == "exbl-batch-exemplars":  # exemplars picked per batch: computed whole
        fb.method.exemplars = None
    fbatch = fb.images.take(torch.arange(7))
    params = list(model.parameters())
    whole = fb.method.loss(model, fbatch)
    shares = sum(fb.method.share(model, fbatch, rank, 3) for rank in range(3))
    assert shares.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-9)
    if whole.requires_grad:
        pairs = zip(*(torch.autograd.grad(t, params, allow_unused=True) for t in (whole, shares)))
        for a, b in pairs:  # None: a parameter the term does not reach (an output bias)
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_failing_job_raises_the_workers_error(tmp_path):
    with pytest.raises(RuntimeError, match="FileNotFoundError: prepared dataset not found"):
        launch(
            2,
            tmp_path / "missing.npz",
            CFG,
            tmp_path / "ddp.pt",
            workdir=tmp_path / "work",
            timeout_s=LAUNCH_TIMEOUT_S,
        )
    assert not (tmp_path / "ddp.pt").exists()


def test_divergence_stops_every_process_with_the_message(dataset, tmp_path):
    data = PreparedData.load(dataset)
    feedback = _feedback(data, lam=1e30)
    feedback.normalize_lambda = False
    with pytest.raises(FeedbackDiverged, match=r"training loss .* at epoch 1 .*'rrr'") as err:
        launch(2, dataset, CFG, tmp_path / "ddp.pt", feedback=feedback, timeout_s=LAUNCH_TIMEOUT_S)
    assert err.value.method == "rrr" and err.value.epoch == 1
    assert (tmp_path / "ddp-last-good.pt").is_file()  # the initial weights, as fit keeps them
    assert not (tmp_path / "ddp.pt").exists()


def test_a_job_past_its_timeout_is_stopped(dataset, tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 3 s"):
        launch(
            2,
            dataset,
            replace(CFG, epochs=500),
            tmp_path / "ddp.pt",
            workdir=tmp_path / "work",
            timeout_s=3,
        )
    assert time.monotonic() - started < 20  # stopped by SIGTERM, not run to its end
    assert not (tmp_path / "ddp.pt").exists()


def _baseline_in_flow(dataset: Path, cfg: TrainConfig, out: Path):
    """`fit` as the pipeline calls it: the baseline task inside a Prefect flow (it logs epochs
    to the run)."""
    from prefect import flow

    from tasks.training import train_baseline

    return flow(name="fit-under-test")(lambda: train_baseline(str(dataset), cfg, str(out)))()


def test_train_devices_in_params_runs_the_pipelines_fit_data_parallel(dataset, tmp_path):
    data = PreparedData.load(dataset)
    one = _baseline_in_flow(dataset, CFG, tmp_path / "one.pt")
    two = _baseline_in_flow(dataset, replace(CFG, devices=2), tmp_path / "two.pt")
    assert (one.world_size, two.world_size) == (1, 2)
    assert len(two.history) == len(one.history) and two.best_epoch == one.best_epoch
    model = build_model("small_cnn", 1, len(data.classes), data.images.shape[-1])
    model.load_state_dict(load_checkpoint(Path(one.checkpoint))[0])
    assert _max_weight_diff(model, Path(two.checkpoint)) < WEIGHT_TOL


def test_fit_keeps_the_last_good_weights_when_feedback_diverges(dataset, tmp_path):
    data = PreparedData.load(dataset)
    feedback = _feedback(data, "rrr", lam=1e30)
    feedback.normalize_lambda = False
    with pytest.raises(FeedbackDiverged, match=r"'rrr', lambda 1e\+30.*Last good weights") as err:
        fit(data, CFG, tmp_path / "model.pt", feedback=feedback)
    assert err.value.epoch == 1 and err.value.lam == 1e30
    assert (tmp_path / "model-last-good.pt").is_file() and not (tmp_path / "model.pt").exists()
