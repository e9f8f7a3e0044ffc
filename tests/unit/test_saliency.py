"""Saliency maps, grid cells and the PNGs the annotator sees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.toy_models import CornerNet
from xbl.explain.cells import cell_scores, cells_to_mask, top_cells
from xbl.explain.metrics import wrong_reason_share
from xbl.explain.render import OUTLINE_RGB, image_png, overlay_png
from xbl.explain.saliency import deeplift_blurred, eval_mode, gaussian_blur, gradcam, saliency_map
from xbl.train.models import SmallCNN

CORNER = np.zeros((28, 28))
CORNER[:4, :4] = 1


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# --- gaussian blur -----------------------------------------------------------------------


def test_blur_keeps_shape_and_a_constant_image():
    x = torch.full((2, 3, 28, 28), 0.7)
    out = gaussian_blur(x, 3.0)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6)  # normalised kernel + reflect padding: no dark border


def test_blur_of_an_impulse_is_the_normalised_gaussian():
    sigma, radius = 1.0, 3
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    out = gaussian_blur(x, sigma)[0, 0]
    one_d = [math.exp(-t * t / (2 * sigma**2)) for t in range(-radius, radius + 1)]
    z = sum(one_d)
    assert out[10, 10].item() == pytest.approx((1 / z) ** 2, rel=1e-5)
    assert out[10, 11].item() == pytest.approx(math.exp(-0.5) / z**2, rel=1e-5)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert out[10, 10 + radius + 1].item() == 0.0  # beyond the kernel's reach


def test_blur_smooths_noise(images):
    assert gaussian_blur(images, 3.0).std() < 0.5 * images.std()


# --- DeepLIFT and GradCAM ----------------------------------------------------------------


def test_deeplift_shape_range_and_per_image_scaling(cnn, images):
    attr = deeplift_blurred(cnn, images)
    assert attr.shape == (4, 28, 28)
    peaks = attr.abs().flatten(1).amax(dim=1)
    assert torch.allclose(peaks, torch.ones(4))
    assert not images.requires_grad


def test_deeplift_explains_the_predicted_class_by_default(cnn, images):
    predicted = cnn(images).argmax(dim=1)
    assert torch.allclose(
        deeplift_blurred(cnn, images), deeplift_blurred(cnn, images, target=predicted)
    )
    other = (predicted + 1) % 10
    assert not torch.allclose(
        deeplift_blurred(cnn, images), deeplift_blurred(cnn, images, target=other)
    )


def test_deeplift_of_a_corner_model_concentrates_in_the_corner(images):
    attr = deeplift_blurred(CornerNet(), images)
    assert (attr[:, :4, :4].abs().flatten(1).amax(dim=1) > 0).all()
    assert (wrong_reason_share(attr, CORNER) > 0.99).all()


def test_deeplift_of_an_image_equal_to_its_baseline_is_zero_not_nan(cnn):
    flat = torch.full((1, 1, 28, 28), 0.3)  # blurring a constant changes nothing
    attr = deeplift_blurred(cnn, flat)
    assert torch.isfinite(attr).all() and attr.abs().max() < 1e-6


def _gradcam_shown(model, x):
    return saliency_map(model, x, "gradcam")


@pytest.mark.parametrize("explain", [deeplift_blurred, _gradcam_shown])
@pytest.mark.parametrize("training", [True, False])
def test_explaining_runs_in_eval_mode_and_restores_the_mode(cnn, images, explain, training):
    modes = []
    cnn.register_forward_hook(lambda m, i, o: modes.append(m.training))
    cnn.train(training)
    explain(cnn, images)
    assert modes and not any(modes)
    assert cnn.training is training


@pytest.mark.parametrize("training", [True, False])
def test_gradcam_itself_explains_in_the_callers_mode(cnn, images, training):
    """The losses train through gradcam: it must not switch a training model to eval."""
    modes = []
    cnn.register_forward_hook(lambda m, i, o: modes.append(m.training))
    cnn.train(training)
    gradcam(cnn, images)
    assert modes and all(mode is training for mode in modes)
    assert cnn.training is training
    modes.clear()
    with eval_mode(cnn):
        gradcam(cnn, images)
    assert modes and not any(modes) and cnn.training is training


def test_gradcam_shape_and_range(cnn, images):
    cam = gradcam(cnn, images)
    assert not images.requires_grad and not cam.requires_grad
    assert cam.shape == (4, 28, 28)
    assert cam.min() >= 0
    nonzero = cam.flatten(1).amax(dim=1) > 0
    assert nonzero.any()
    assert torch.allclose(cam.flatten(1).amax(dim=1)[nonzero], torch.ones(int(nonzero.sum())))


def test_gradcam_of_a_corner_model_concentrates_in_the_corner(images):
    cam = gradcam(CornerNet(), images)
    near_corner = np.zeros((28, 28))
    near_corner[:6, :6] = 1  # the 3x3 conv spreads the 4x4 patch by one pixel
    assert (wrong_reason_share(cam, near_corner) > 0.99).all()


# --- grid cells ---------------------------------------------------------------------------


def test_cell_scores_are_block_means():
    attr = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    scores = cell_scores(attr, 4)
    assert scores.shape == (2, 2, 2)
    for n in range(2):
        for r in range(2):
            for c in range(2):
                block = attr[n, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
                assert scores[n, r, c].item() == pytest.approx(block.mean().item())


def _brute_force_top(attr: torch.Tensor, cell: int, k: int) -> list[tuple[int, int]]:
    rows, cols = attr.shape[0] // cell, attr.shape[1] // cell
    means = {
        (r, c): attr[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].mean().item()
        for r in range(rows)
        for c in range(cols)
    }
    return sorted(means, key=means.get, reverse=True)[:k]


def test_top_cells_are_really_the_top_scoring_cells():
    attr = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(7))
    cells = top_cells(attr, 4, 10)
    assert cells.shape == (3, 10, 2) and cells.dtype == torch.long
    for n in range(3):
        assert [tuple(rc) for rc in cells[n].tolist()] == _brute_force_top(attr[n], 4, 10)


def test_argsort_of_argsort_would_fail_the_top_cells_check():
    attr = torch.rand(28, 28, generator=torch.Generator().manual_seed(7))
    scores = cell_scores(attr[None], 4)[0].flatten().numpy()
    slip = np.argsort(np.argsort(-scores))[:10]  # the paper code's ranks-instead-of-indices
    slip_cells = [(int(i) // 7, int(i) % 7) for i in slip]
    assert set(slip_cells) != set(_brute_force_top(attr, 4, 10))


def test_top_cells_rank_by_magnitude_so_evidence_against_the_class_is_shown():
    """A cell pushing the predicted logit down (a label-coded patch often does) is still a
    cell the model uses; the signed ranking (the paper's) would hide it."""
    attr = torch.full((1, 28, 28), 0.1)
    attr[0, 24:28, 0:4] = -1.0  # strong negative evidence in the bottom-left cell
    attr[0, 8:12, 8:12] = 0.5  # the strongest positive cell
    assert top_cells(attr, 4, 2)[0].tolist() == [[6, 0], [2, 2]]
    signed = top_cells(attr, 4, 2, signed=True)[0].tolist()
    assert signed[0] == [2, 2] and [6, 0] not in signed
    # within a cell, signs cancel: a cell of mixed +/- is weaker than a uniform one
    mixed = torch.zeros(1, 8, 4)
    mixed[0, :4, :2], mixed[0, :4, 2:] = 1.0, -1.0
    mixed[0, 4:, :] = 0.3
    assert top_cells(mixed, 4, 1)[0].tolist() == [[1, 0]]


def test_saliency_map_dispatches_by_name(cnn, images):
    with eval_mode(cnn):
        shown = gradcam(cnn, images)
    assert torch.equal(saliency_map(cnn, images, "gradcam"), shown)
    assert torch.allclose(
        saliency_map(cnn, images, "deeplift", sigma=2.0), deeplift_blurred(cnn, images, sigma=2.0)
    )
    with pytest.raises(ValueError, match="unknown saliency"):
        saliency_map(cnn, images, "lime")


def test_top_cells_caps_k_at_the_number_of_cells():
    assert top_cells(torch.rand(1, 8, 8), 4, 10).shape == (1, 4, 2)


def test_cells_to_mask_marks_exactly_the_cells():
    mask = cells_to_mask([(0, 0), (2, 1)], 4, 28, 28)
    assert mask.dtype == bool and mask.shape == (28, 28)
    assert mask.sum() == 2 * 16
    assert mask[:4, :4].all() and mask[8:12, 4:8].all()
    assert not mask[4:8].any()


def test_cells_to_mask_round_trips_with_top_cells():
    attr = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(3))
    cells = top_cells(attr, 4, 5)[0]
    mask = cells_to_mask(cells, 4, 28, 28)
    on = cell_scores(torch.from_numpy(mask)[None].float(), 4)[0]
    assert on.sum() == 5
    assert all(on[r, c] == 1 for r, c in cells.tolist())


def test_cells_to_mask_rejects_a_cell_outside_the_image():
    with pytest.raises(ValueError):
        cells_to_mask([(7, 0)], 4, 28, 28)


# --- PNGs -------------------------------------------------------------------------------------


def test_image_png_is_an_upscaled_copy(tmp_path):
    image = torch.zeros(1, 28, 28)
    image[0, 5, 6] = 1.0
    path = image_png(image, tmp_path / "sub" / "x.png", scale=10)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (280, 280, 3)
    assert (png[50:60, 60:70] == 255).all()
    assert png.sum() == 255 * 3 * 100


def test_overlay_png_size_outlines_and_heat(tmp_path):
    image = np.full((1, 28, 28), 0.5)
    attr = np.zeros((28, 28))
    attr[20:24, 20:24] = 1.0
    path = overlay_png(image, attr, [(0, 0)], 4, tmp_path / "o.png", scale=10)
    png = np.asarray(Image.open(path))
    assert Image.open(path).mode == "RGB" and png.shape == (280, 280, 3)
    assert (
        tuple(png[0, 20]) == OUTLINE_RGB and tuple(png[39, 20]) == OUTLINE_RGB
    )  # top and bottom edges
    assert tuple(png[20, 20]) != OUTLINE_RGB  # inside the cell: not filled
    hot, cold = (
        png[215, 215].astype(int),
        png[150, 150].astype(int),
    )  # same gray, different attribution
    assert hot[0] > cold[0] and hot[2] < cold[2]


def test_overlay_png_accepts_uint8_like_float(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    attr = rng.normal(size=(28, 28))  # signed: diverging map
    a = np.asarray(Image.open(overlay_png(image, attr, [(1, 1)], 4, tmp_path / "a.png")))
    b = np.asarray(Image.open(overlay_png(image / 255.0, attr, [(1, 1)], 4, tmp_path / "b.png")))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("side", [28, 64, 224, 1024])
def test_what_the_annotator_sees_fits_the_screen_whole(tmp_path, side):
    """Small images are upscaled to be seen, large ones shrunk to show whole (image and
    overlay side by side in a 1600×1000 window)."""
    from xbl.explain.render import MAX_SIDE, display_scale

    rgb = np.random.default_rng(0).integers(0, 255, (3, side, side), dtype=np.uint8)
    scale = display_scale(side, side)
    shown = Image.open(image_png(rgb, tmp_path / "i.png", scale)).size
    overlay = Image.open(
        overlay_png(rgb, np.ones((side, side)), [(0, 0)], 4, tmp_path / "o.png", scale)
    ).size
    assert shown == overlay
    assert 400 <= shown[0] <= MAX_SIDE  # visible, and never wider than half the window
    pixels = np.asarray(Image.open(tmp_path / "i.png"))
    assert not np.array_equal(pixels[..., 0], pixels[..., 1])  # colour stays colour
