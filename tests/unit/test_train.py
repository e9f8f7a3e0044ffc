"""The training loop: determinism, early stopping, λ normalisation, the divergence guard, and
that the feedback term sees only the annotated images."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from xbl.config import TrainConfig, build_config
from xbl.feedback.losses import rrr_penalty
from xbl.feedback.methods import METHODS, RRR, AnnotatedImages
from xbl.feedback.schedule import Feedback
from xbl.train.loop import FeedbackDiverged, _step_losses, mean_loss, training_loop
from xbl.train.models import SmallCNN

N_CLASSES = 4


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable toy data: the label is a bright 6x6 block in one of four places, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    x = 0.3 * torch.rand(n, 1, 28, 28, generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = 6 + 10 * (label // 2), 6 + 10 * (label % 2)
        x[i, 0, r : r + 6, c : c + 6] = 1.0
    return x, y


@pytest.fixture
def data():
    tx, ty = _images(96, seed=1)
    vx, vy = _images(48, seed=2)
    return (tx, ty), (vx, vy)


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(n_classes=N_CLASSES)


def _feedback(
    method: str = "rrr",
    n: int = 8,
    lam: float = 10.0,
    normalize: bool = False,
    per_batch: int = 4,
    W: torch.Tensor | None = None,
) -> Feedback:
    x, y = _images(n, seed=3)
    x[:, :, :4, :4] = 0.8  # a corner "decoy" the annotator marked
    if W is None:
        W = torch.zeros(n, 28, 28)
        W[:, :4, :4] = 1.0
    return Feedback(
        method=METHODS[method](),
        images=AnnotatedImages(x, y, W, 1.0 - W),
        lam=lam,
        normalize_lambda=normalize,
        per_batch=per_batch,
        every=1,  # the term on every step
    )


def _spy_on_rrr(monkeypatch, record) -> None:
    """Call `record(batch)` whenever the RRR term is computed (on the annotated images drawn)."""
    real = RRR.loss_and_logits

    def spy(self, model, batch):
        term, logits = real(self, model, batch)
        record(batch, term)
        return term, logits

    monkeypatch.setattr(RRR, "loss_and_logits", spy)


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _snapshots(model):
    """on_epoch callback that keeps a copy of the weights after every epoch."""
    states = []
    return states, lambda row: states.append(copy.deepcopy(model.state_dict()))


# --- determinism and early stopping -----------------------------------------------------------


@pytest.mark.parametrize("method", [None, "rrr"])
def test_two_trainings_with_the_same_seed_give_identical_weights(data, method):
    cfg = TrainConfig(epochs=2, batch_size=32, seed=5, patience=0)
    states = []
    for _ in range(2):
        model = _model()
        training_loop(model, *data, cfg, feedback=_feedback() if method else None)
        states.append(model.state_dict())
    assert _same_weights(*states)
    other = _model()
    training_loop(
        other,
        *data,
        TrainConfig(epochs=2, batch_size=32, seed=6, patience=0),
        feedback=_feedback() if method else None,
    )
    assert not _same_weights(states[0], other.state_dict())  # the seed does matter


def test_early_stopping_stops_and_restores_the_best_epoch(data):
    (tx, ty), (vx, vy) = data
    # validation labels shifted by one: learning the training labels makes val loss worse
    model = _model()
    states, keep = _snapshots(model)
    cfg = TrainConfig(lr=3e-3, epochs=30, batch_size=32, patience=2)
    result = training_loop(model, (tx, ty), (vx, (vy + 1) % N_CLASSES), cfg, on_epoch=keep)
    epochs_run = len(result.history)
    assert epochs_run < cfg.epochs
    assert epochs_run == result.best_epoch + cfg.patience
    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert _same_weights(model.state_dict(), states[result.best_epoch - 1])
    assert not _same_weights(model.state_dict(), states[-1])
    assert mean_loss(model, (vx, (vy + 1) % N_CLASSES)) == pytest.approx(result.min_val_loss)


def test_patience_zero_keeps_the_last_epoch_even_when_val_gets_worse(data):
    (tx, ty), (vx, vy) = data
    model = _model()
    states, keep = _snapshots(model)
    result = training_loop(
        model,
        (tx, ty),
        (vx, (vy + 1) % N_CLASSES),
        TrainConfig(lr=3e-3, epochs=4, batch_size=32, patience=0),
        on_epoch=keep,
    )
    assert len(result.history) == 4 and result.best_epoch == 4
    assert _same_weights(model.state_dict(), states[-1])


# --- λ normalisation ---------------------------------------------------------------------------


def test_normalised_lambda_starts_the_term_at_lambda_times_the_cross_entropy(data):
    (tx, ty), (vx, vy) = data
    fb = _feedback(lam=7.0, normalize=True, per_batch=8)  # every annotated image in each batch
    model = _model()
    initial = copy.deepcopy(model)
    # one batch holds the whole training set: the first batch is known without the shuffle
    result = training_loop(
        model,
        (tx, ty),
        (vx, vy),
        TrainConfig(epochs=1, batch_size=len(ty), patience=0),
        feedback=fb,
    )
    initial.train()
    images = fb.images
    ce0 = F.cross_entropy(initial(torch.cat([tx, images.x])), torch.cat([ty, images.y])).item()
    term0 = rrr_penalty(initial, images.x, images.W).item()
    assert term0 > 0
    assert result.initial_ce == pytest.approx(ce0, rel=1e-4)
    assert result.initial_feedback == pytest.approx(term0, rel=1e-4)
    assert result.effective_lambda * term0 == pytest.approx(7.0 * ce0, rel=1e-4)


def test_normalisation_waits_for_the_first_batch_whose_term_is_nonzero(data, monkeypatch):
    """Images whose annotators ignored nothing give a zero term; scaling λ by CE/0 there is
    undefined, so λ is scaled at the first batch that carries a nonzero term."""
    W = torch.zeros(8, 28, 28)
    W[7, :4, :4] = 1.0  # one annotated image in eight has something to ignore
    fb = _feedback(lam=7.0, normalize=True, per_batch=1, W=W)
    seen = []
    _spy_on_rrr(monkeypatch, lambda batch, term: seen.append(term.item()))
    result = training_loop(
        _model(), *data, TrainConfig(epochs=2, batch_size=16, patience=0), feedback=fb
    )
    assert seen[0] == 0.0 and any(t > 0 for t in seen)  # the first batch had nothing to scale by
    assert result.initial_feedback == next(t for t in seen if t > 0)
    lam_times_term = result.effective_lambda * result.initial_feedback
    assert lam_times_term == pytest.approx(7.0 * result.initial_ce)


def test_without_normalisation_lambda_is_used_as_given(data):
    result = training_loop(
        _model(),
        *data,
        TrainConfig(epochs=1, batch_size=48, patience=0),
        feedback=_feedback(lam=3.0, normalize=False),
    )
    assert result.effective_lambda == 3.0


# --- the divergence guard ------------------------------------------------------------------------


class PoisonableCNN(SmallCNN):
    """Returns NaN logits on demand (a stand-in for weights blowing up): in training after
    `train_calls_left` more forward passes, or in evaluation once `poison_eval` is set."""

    train_calls_left: int | None = None
    poison_eval = False

    def forward(self, x):
        out = super().forward(x)
        if self.training and self.train_calls_left is not None:
            self.train_calls_left -= 1
            if self.train_calls_left < 0:
                return out * float("nan")
        if not self.training and self.poison_eval:
            return out * float("nan")
        return out


def _poisonable() -> PoisonableCNN:
    torch.manual_seed(0)
    return PoisonableCNN(n_classes=N_CLASSES)


def test_nan_raises_naming_method_lambda_epoch_and_keeps_the_last_good_weights(data):
    model = _poisonable()
    good = {}

    def after_epoch(row):
        if row["epoch"] == 1:
            good.update(copy.deepcopy(model.state_dict()))
            model.train_calls_left = 4  # two more batches (term + CE forward each), then NaN

    with pytest.raises(FeedbackDiverged) as err:
        training_loop(
            model,
            *data,
            TrainConfig(epochs=3, batch_size=32, patience=0),
            feedback=_feedback("rrr_g", lam=2.5),
            on_epoch=after_epoch,
        )
    message = str(err.value)
    assert "'rrr_g'" in message and "lambda 2.5" in message and "epoch 2" in message
    assert (err.value.method, err.value.lam, err.value.epoch, err.value.best_epoch) == (
        "rrr_g",
        2.5,
        2,
        1,
    )
    assert _same_weights(model.state_dict(), good)  # epoch 2's two steps are undone


def test_a_nan_validation_loss_is_divergence_too(data):
    model = _poisonable()
    good = {}

    def after_epoch(row):
        if row["epoch"] == 1:
            good.update(copy.deepcopy(model.state_dict()))
            model.poison_eval = True

    with pytest.raises(FeedbackDiverged, match="validation loss is nan at epoch 2"):
        training_loop(
            model,
            *data,
            TrainConfig(epochs=3, batch_size=32, patience=0),
            feedback=_feedback("rrr", lam=1.0),
            on_epoch=after_epoch,
        )
    assert _same_weights(model.state_dict(), good)


def test_an_exploding_term_raises_before_any_step_and_keeps_the_initial_weights(data):
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(FeedbackDiverged, match=r"'rrr'.*lambda 1e\+30|lambda 1e\+30.*'rrr'") as err:
        training_loop(
            model,
            *data,
            TrainConfig(epochs=2, batch_size=32, patience=0),
            feedback=_feedback("rrr", lam=1e30),
        )
    assert err.value.epoch == 1 and err.value.best_epoch == 0
    assert _same_weights(model.state_dict(), initial)


# --- the feedback term sees only the annotated images ----------------------------------------


def test_feedback_term_is_computed_on_annotated_rows_only(data, monkeypatch):
    (tx, ty), (vx, vy) = data
    fb = _feedback(per_batch=3)
    seen = []
    _spy_on_rrr(
        monkeypatch,
        lambda batch, term: seen.append((batch.x.clone(), batch.y.clone(), batch.W.clone())),
    )
    training_loop(
        _model(), (tx, ty), (vx, vy), TrainConfig(epochs=2, batch_size=32, patience=0), feedback=fb
    )
    assert len(seen) == 2 * 3  # one call per batch: 96 images / 32 per batch, 2 epochs
    annotated = fb.images
    for x, y, W in seen:
        assert len(x) == 3
        for xi, yi, Wi in zip(x, y, W):
            match = [j for j in range(len(annotated)) if torch.equal(annotated.x[j], xi)]
            assert len(match) == 1  # an annotated image, never a plain training image
            assert yi == annotated.y[match[0]] and torch.equal(Wi, annotated.W[match[0]])


@pytest.mark.parametrize("method", ["rrr", "rrr_output"])
def test_reusing_the_terms_logits_gives_the_step_of_a_second_forward_pass(data, method):
    """The RRR terms hand back their forward pass's logits and the step takes the annotated
    images' CE from them: on a model without batch statistics the losses and every parameter
    gradient equal those of appending the images to the batch and running them again."""
    (tx, ty), _ = data
    fb = _feedback(method)
    fbatch = fb.images.take(torch.arange(4))
    grads, values = [], []
    for reuse in (True, False):
        model = _model()
        if not reuse:  # the method as one that gives no logits back
            plain = copy.copy(fb.method)
            plain.loss_and_logits = lambda m, b: (fb.method.loss(m, b), None)
            fb_used = replace(fb, method=plain)
        else:
            fb_used = fb
        ce, expl, ce_value, expl_value = _step_losses(
            model, tx[:32], ty[:32], fb_used, fbatch, torch.device("cpu"), False
        )
        (ce + 10.0 * expl).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        values.append((ce_value, expl_value))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert expl_value > 0
    for reused, again in zip(*grads):
        torch.testing.assert_close(reused, again, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [16, 8])
@pytest.mark.parametrize("method", ["rrr_output", "hint"])
def test_fewer_images_a_step_keep_the_terms_expected_gradient(method, n):
    """λ means what it means at 16 images a step whatever `per_batch` is: over draws of 4 that
    cover the n annotated images, the weighted term's mean gradient is that of 16 a step (all
    n at once), both for a term that sums over images (rrr_output: weighted n/4 more) and for
    one that averages them (hint: not)."""
    all16 = _feedback(method, n=n, per_batch=16)
    by4 = _feedback(method, n=n, per_batch=4)
    model = _model()

    def gradient(fb, rows):
        model.zero_grad()
        term = fb.method.loss(model, fb.images.take(rows))
        (fb.step_weight(fb.lam) * term).backward()
        # a bias after the last nonlinearity does not move an input gradient: no grad
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        return torch.cat([g.flatten() for g in grads])

    whole = gradient(all16, torch.arange(n))
    drawn = torch.stack([gradient(by4, torch.arange(i, i + 4)) for i in range(0, n, 4)])
    assert whole.abs().max() > 0
    torch.testing.assert_close(drawn.mean(0), whole, rtol=1e-3, atol=1e-7)


def test_a_normalised_lambda_takes_no_per_batch_factor():
    fb = _feedback("rrr_output", n=16, per_batch=4, normalize=True)
    assert fb.step_weight(2.0) == 2.0  # measured on the drawn images themselves
    assert _feedback("rrr_output", n=16, per_batch=4).step_weight(2.0) == 8.0
    # fewer annotated images than a step draws: all of them, as at 16 a step
    assert _feedback("rrr_output", n=3, per_batch=6).step_weight(2.0) == 2.0


def test_the_loop_weights_the_term_by_step_weight(data, monkeypatch):
    """The loop multiplies the term by what `step_weight` gives: made 0, training with λ 50
    ends on the weights of training with λ 0; left alone, it does not."""
    weights = {}
    for name, lam, zeroed in (
        ("zeroed", 50.0, True),
        ("lambda 0", 0.0, False),
        ("as is", 50.0, False),
    ):
        if zeroed:
            monkeypatch.setattr(Feedback, "step_weight", lambda self, lam: 0.0)
        else:
            monkeypatch.undo()
        model = _model()
        training_loop(
            model,
            *data,
            TrainConfig(epochs=1, batch_size=32, patience=0),
            feedback=_feedback(lam=lam, per_batch=4),
        )
        weights[name] = model.state_dict()
    assert _same_weights(weights["zeroed"], weights["lambda 0"])
    assert not _same_weights(weights["as is"], weights["lambda 0"])


def test_an_empty_mask_adds_nothing_beyond_the_extra_rows(data):
    """With W = 0 the RRR term is exactly zero: training equals λ = 0 on the same rows."""
    weights = []
    for lam in (50.0, 0.0):
        model = _model()
        fb = _feedback(lam=lam, W=torch.zeros(8, 28, 28))
        result = training_loop(
            model, *data, TrainConfig(epochs=2, batch_size=32, patience=0), feedback=fb
        )
        assert all(row["train_feedback"] == 0.0 for row in result.history)
        weights.append(model.state_dict())
    assert _same_weights(*weights)


# --- mixed precision ---------------------------------------------------------------------------


def test_amp_autocasts_the_cross_entropy_but_not_the_feedback_term(data, monkeypatch):
    autocast_during_term = []
    real = RRR.loss_and_logits

    def spy(self, model, batch):
        autocast_during_term.append(torch.is_autocast_enabled("cpu"))
        return real(self, model, batch)

    monkeypatch.setattr(RRR, "loss_and_logits", spy)
    model = _model()
    logit_dtypes = set()
    model.head.register_forward_hook(lambda _m, _i, out: logit_dtypes.add(out.dtype))
    result = training_loop(
        model,
        *data,
        TrainConfig(epochs=1, batch_size=32, patience=0, amp=True),
        feedback=_feedback(),
    )
    assert autocast_during_term and not any(autocast_during_term)
    assert {torch.bfloat16, torch.float32} <= logit_dtypes  # CE forward cast, the term's not
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history[0]["train_feedback"] > 0
    assert build_config({"train": {"amp": True, "device": "cpu"}}).train.amp is True
