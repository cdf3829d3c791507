"""Evidence checks on models whose right answer is known.

The trained tiny model sees 16x16 noise images; class 1 means a bright 3x3 blob somewhere in the
top-left 6x6 corner, and a distractor blob in the right half appears in both classes. So the
corner decides the class and the right half must not matter: deletion in the corner-first
order must kill the class-1 score faster than a random order, and filling the corner must flip
the prediction while filling the right half must not.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.attribution import integrated_gradients, saliency
from napari_gradcam.core.evidence import (
    Cancelled,
    agreement,
    check_forbidden_region,
    deletion_insertion,
    energy_in_region,
    random_placements,
    randomisation_check,
    region_test,
)
from napari_gradcam.core.similarity import normalise_map, pearson, spearman, ssim, top_k_iou

torch.set_num_threads(1)

SIZE = 16
CORNER = np.zeros((SIZE, SIZE), dtype=bool)
CORNER[:6, :6] = True
RIGHT_HALF = np.zeros((SIZE, SIZE), dtype=bool)
RIGHT_HALF[:, 9:] = True


def make_blob_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has a blob in the corner; a distractor blob on the right, 50%."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(count, 1, SIZE, SIZE, generator=generator)
    y = torch.randint(0, 2, (count,), generator=generator)
    for index in range(count):
        if y[index] == 1:
            row, col = (int(v) for v in torch.randint(0, 4, (2,), generator=generator))
            x[index, 0, row:row + 3, col:col + 3] += 1.0
        if torch.rand(1, generator=generator) < 0.5:
            row = int(torch.randint(0, SIZE - 3, (1,), generator=generator))
            col = int(torch.randint(9, SIZE - 3, (1,), generator=generator))
            x[index, 0, row:row + 3, col:col + 3] += 1.0
    return x, y


@pytest.fixture(scope="module")
def blob_model() -> tuple[nn.Module, torch.Tensor]:
    """A trained convolutional classifier (about a second of CPU) and class-1 test samples."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 2),
    )
    x, y = make_blob_data(512, seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    x_test, y_test = make_blob_data(256, seed=1)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.97, f"the tiny model did not learn the task (accuracy {accuracy:.2f})"
    return model, x_test[y_test == 1][:4]


def model_state(model: nn.Module) -> tuple:
    return (
        tuple(module.training for module in model.modules()),
        tuple(parameter.requires_grad for parameter in model.parameters()),
        tuple(len(module._forward_hooks) + len(module._forward_pre_hooks)
              for module in model.modules()),
        tuple(parameter.detach().clone().double().sum().item() for parameter in model.parameters()),
    )


# ---------------------------------------------------------------------------- deletion/insertion


@pytest.mark.parametrize("removal", ["mean", 0.0])
def test_deletion_in_true_order_beats_random(blob_model, removal) -> None:
    model, x = blob_model
    truth = np.broadcast_to(CORNER.astype(float), (len(x), SIZE, SIZE))
    result = deletion_insertion(model, x, truth, target=1, steps=16, removal=removal)
    assert result.fractions[0] == 0 and result.fractions[-1] == 1
    assert result.scores.shape == (len(x), 17)
    assert np.all(result.auc < result.random_auc - 0.2), result.summary()
    assert result.better_than_random.all()
    # The curve starts at the clean probability and ends at the probability of the all-removed
    # input; both are a plain forward pass away.
    with torch.no_grad():
        clean = torch.softmax(model(x), dim=1)[:, 1].numpy()
        filler = x.mean(dim=(2, 3), keepdim=True).expand_as(x) if removal == "mean" else 0 * x
        gone = torch.softmax(model(filler), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(result.scores[:, 0], clean, rtol=1e-5)
    np.testing.assert_allclose(result.scores[:, -1], gone, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.random_scores[:, 0], clean, rtol=1e-5)


def test_insertion_in_true_order_beats_random(blob_model) -> None:
    model, x = blob_model
    truth = np.broadcast_to(CORNER.astype(float), (len(x), SIZE, SIZE))
    result = deletion_insertion(model, x, truth, target=1, steps=16, mode="insertion",
                                removal=0.0, n_random=2, seed=1)
    assert np.all(result.auc > result.random_auc + 0.2), result.summary()
    assert "better than random" in result.summary()


def test_deletion_of_gradient_saliency_beats_random(blob_model) -> None:
    model, x = blob_model
    result = deletion_insertion(model, x, saliency(model, x, target=1), target=1, steps=16)
    assert result.removal == "mean"
    assert result.better_than_random.all(), result.summary()


def test_deletion_curve_of_linear_model_by_hand() -> None:
    """f = w·x, baseline 0, one pixel per step: score_k = f(x) - sum of the k largest w_i x_i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 1)).eval()
    x = torch.randn(1, 1, 6)
    contributions = (model[1].weight[0] * x[0, 0]).detach().numpy()
    full = float(model(x)[0, 0].detach())
    order = np.argsort(-contributions)
    expected = full - np.concatenate([[0.0], np.cumsum(contributions[order])])
    result = deletion_insertion(model, x, contributions, target=lambda out: out[:, 0],
                                steps=6, removal=0.0, random_baseline=False, batch_size=4)
    np.testing.assert_allclose(result.scores[0], expected, rtol=1e-5, atol=1e-6)
    area = np.sum((expected[1:] + expected[:-1]) / 2) / 6
    assert result.auc[0] == pytest.approx(area, rel=1e-5)
    assert result.random_auc is None and result.better_than_random is None


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_deletion_insertion_runs_in_1d_and_3d(spatial_dims: int) -> None:
    model = build_architecture("resnet_like", spatial_dims=spatial_dims, widths=(4, 8)).eval()
    shape = (32,) if spatial_dims == 1 else (8, 8, 8)
    x = torch.randn(2, 1, *shape)
    saliency_map = saliency(model, x, target=0)
    for mode in ("deletion", "insertion"):
        result = deletion_insertion(model, x, saliency_map, target=0, steps=5, mode=mode,
                                    batch_size=7)
        assert result.scores.shape == (2, 6)
        assert np.all((result.scores >= 0) & (result.scores <= 1))
        assert np.all((result.auc >= 0) & (result.auc <= 1))
    single = deletion_insertion(model, x[:1], saliency_map[0], target=0, steps=5)
    assert single.scores.shape == (1, 6)


# ---------------------------------------------------------------------------- region test


@pytest.mark.parametrize("fill", ["mean", "inpaint", 0.0])
def test_filling_the_deciding_region_flips_the_prediction(blob_model, fill) -> None:
    model, x = blob_model
    result = region_test(model, x, CORNER, target=1, fill=fill)
    assert np.all(result.predicted_before == 1)
    assert np.all(result.predicted_after == 0)
    assert result.flipped.all()
    assert np.all(result.probability_after < 0.1)
    assert np.all(result.score_drop > 0)
    assert result.filled.shape == tuple(x.shape)
    # Outside the mask the input is untouched.
    np.testing.assert_array_equal(result.filled[:, 0][:, ~CORNER], x[:, 0].numpy()[:, ~CORNER])


def test_filling_an_ignored_region_changes_nothing(blob_model) -> None:
    model, x = blob_model
    result = region_test(model, x, RIGHT_HALF, target=1, fill="inpaint")
    assert not result.flipped.any()
    assert np.all(result.probability_after > 0.9)
    np.testing.assert_allclose(result.probabilities_after.sum(axis=1), 1.0, rtol=1e-6)


def test_inpaint_fill_is_smooth_and_within_surrounding_range() -> None:
    model = build_architecture("resnet_like", spatial_dims=3, widths=(4, 8)).eval()
    x = torch.linspace(0, 1, 8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).clone()
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[2:6, 2:6, 2:6] = True
    x[0, 0][torch.from_numpy(mask)] = 50.0  # an outlier object to erase
    result = region_test(model, x, mask, target=0, fill="inpaint")
    inside = result.filled[0, 0][mask]
    assert inside.max() <= 1.0 + 1e-6 and inside.min() >= 0.0  # the object is gone
    by_mean = region_test(model, x, mask, target=0, fill="mean")
    np.testing.assert_allclose(by_mean.filled[0, 0][mask], x[0, 0][~torch.from_numpy(mask)].mean(),
                               rtol=1e-5)


class ReadsOneRegion(nn.Module):
    """Two logits, ±(sum of the input over a fixed region): a model whose answer depends on
    that region and on nothing else, by construction."""

    def __init__(self, region: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = (x[:, 0] * self.region).flatten(1).sum(1)
        return torch.stack([total, -total], dim=1)


class ReadsEverything(nn.Module):
    """Two logits, ±(mean of the input): every pixel matters a little and equally, so filling
    any region lowers the score by about the same small amount (the false pass of a bare
    drop: a 0.004 fall in probability)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.flatten(1).mean(1)
        return torch.stack([total, -total], dim=1)


def _bright_image(seed: int = 0) -> torch.Tensor:
    """Positive noise (so removing any pixel by filling it with zero lowers a sum)."""
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.5, 1.5, (1, 1, SIZE, SIZE))
                            ).float()


def test_region_that_decides_stands_out_from_random_regions_of_its_shape() -> None:
    model, x = ReadsOneRegion(CORNER), _bright_image()
    result = region_test(model, x, CORNER, target=0, fill=0.0, n_null=50, seed=3)
    # by hand: the drop is the region's sum; random regions elsewhere do not touch the corner
    assert result.score_drop[0] == pytest.approx(float(x[0, 0][torch.from_numpy(CORNER)].sum()),
                                                 rel=1e-5)
    assert result.null_drops.shape == (1, 50)
    np.testing.assert_allclose(result.null_drops, 0.0, atol=1e-5)
    assert result.p_value[0] == pytest.approx(1 / 51)  # no random region drops as much
    assert result.effect_size[0] == np.inf  # the null has no spread at all
    assert result.stands_out(0.05)[0]


def test_region_that_the_model_ignores_does_not_stand_out() -> None:
    ignored = np.zeros((SIZE, SIZE), dtype=bool)
    ignored[10:14, 10:14] = True
    result = region_test(ReadsOneRegion(CORNER), _bright_image(), ignored, target=0, fill=0.0,
                         n_null=50, seed=3)
    assert result.score_drop[0] == pytest.approx(0.0, abs=1e-5)
    # random squares that land on the corner drop the score, the others by nothing at all
    assert (result.null_drops > 0.1).any() and result.p_value[0] == 1.0
    assert not result.stands_out(0.05)[0]


def test_a_drop_that_any_region_gives_does_not_stand_out() -> None:
    """The old criterion (drop > 0) passed this; against its null it fails."""
    x = _bright_image(1)
    result = region_test(ReadsEverything(), x, CORNER, target=0, fill=0.0, n_null=50, seed=0)
    assert result.score_drop[0] > 0  # what used to pass
    # each random 6x6 square removes its own sum / 256: drops of the same size as the corner's
    null_by_hand = result.null_drops[0]
    assert 0.5 * result.score_drop[0] < np.median(null_by_hand) < 2 * result.score_drop[0]
    expected_p = (1 + np.sum(null_by_hand >= result.score_drop[0])) / 51
    assert result.p_value[0] == pytest.approx(expected_p)
    assert result.p_value[0] > 0.05 and not result.stands_out(0.05)[0]
    mean, spread = null_by_hand.mean(), null_by_hand.std(ddof=1)
    assert result.effect_size[0] == pytest.approx((result.score_drop[0] - mean) / spread)


def test_trained_model_deciding_corner_stands_out_and_distractor_does_not(blob_model) -> None:
    model, x = blob_model
    corner = region_test(model, x[:2], CORNER, target=1, fill="inpaint", n_null=50, seed=0)
    assert corner.stands_out(0.05).all() and (corner.effect_size > 3).all()
    half = np.zeros((SIZE, SIZE), dtype=bool)
    half[4:10, 10:16] = True  # where the distractor blobs are, which both classes have
    distractor = region_test(model, x[:2], half, target=1, fill="inpaint", n_null=50, seed=0)
    assert not distractor.stands_out(0.05).any()


def test_random_placements_keep_the_shape_and_avoid_the_region() -> None:
    rng = np.random.default_rng(0)
    shape = np.zeros((12, 12), dtype=bool)
    shape[2:5, 3:8] = True
    shape[4, 3] = False  # not a rectangle: the exact shape must travel
    moved, how = random_placements(shape, 20, rng)
    assert len(moved) == 20 and how == "shifted inside the input"
    for copy_ in moved:
        assert copy_.sum() == shape.sum() and not (copy_ & shape).any()
        rows, cols = np.nonzero(copy_)
        np.testing.assert_array_equal(copy_[rows.min():rows.min() + 3, cols.min():cols.min() + 5],
                                      shape[2:5, 3:8])
    # a band across the whole width fits nowhere else whole in x, but can move in y
    band = np.zeros((12, 12), dtype=bool)
    band[0:3, :] = True
    moved, how = random_placements(band, 5, rng)
    assert len(moved) == 5 and all(m.sum() == 36 and not (m & band).any() for m in moved)
    # a region covering most of the input has no null
    most = np.ones((12, 12), dtype=bool)
    most[0, 0] = False
    assert random_placements(most, 5, rng) == ([], "no random placement avoids the region (it "
                                                    "covers too much of the input)")
    with pytest.raises(ValueError, match="n_null"):
        region_test(ReadsEverything(), _bright_image(), CORNER, n_null=-1)


# ---------------------------------------------------------------------------- energy


class IgnoresRegion(nn.Module):
    """Multiplies the input by a fixed mask before a classifier: the masked-out pixels cannot
    matter (like a network that crops away a scale bar)."""

    def __init__(self, classifier: nn.Module, keep: np.ndarray) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("keep", torch.from_numpy(keep.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x * self.keep)


def test_energy_of_ignored_region_is_zero_and_passes_forbidden_check(blob_model) -> None:
    trained, x = blob_model
    scale_bar = np.zeros((SIZE, SIZE), dtype=bool)
    scale_bar[13:, 8:] = True
    model = IgnoresRegion(trained, keep=~scale_bar).eval()
    for cam in (saliency(model, x, target=1), integrated_gradients(model, x, target=1, steps=8)):
        shares = energy_in_region(cam, scale_bar)
        assert shares.shape == (len(x),)
        np.testing.assert_allclose(shares, 0.0, atol=1e-7)
        check = check_forbidden_region(cam, scale_bar, threshold=0.2, region_name="scale bar")
        assert not check.exceeded and check.message is None


def test_model_looking_only_at_the_scale_bar_is_flagged(blob_model) -> None:
    trained, x = blob_model
    scale_bar = np.zeros((SIZE, SIZE), dtype=bool)
    scale_bar[13:, 8:] = True
    model = IgnoresRegion(trained, keep=scale_bar).eval()
    cam = saliency(model, x, target=1)
    np.testing.assert_allclose(energy_in_region(cam, scale_bar), 1.0, rtol=1e-6)
    check = check_forbidden_region(cam[0], scale_bar, threshold=0.2, region_name="scale bar")
    assert check.exceeded and check.energy_share == pytest.approx(1.0)
    assert "scale bar" in check.message and "100%" in check.message


def test_energy_in_region_by_hand_1d_and_3d() -> None:
    # the positive part counts (core.metrics.energy_share): 4 of 1 + 4; the -3 is evidence
    # against the class, not attention on the region (|map| would give 7/8)
    one_d = np.array([1.0, -3.0, 0.0, 4.0])
    assert energy_in_region(one_d, np.array([False, True, False, True])) == pytest.approx(4 / 5)
    assert np.isnan(energy_in_region(-np.abs(one_d), np.ones(4, dtype=bool)))  # no positive mass
    volume = np.zeros((4, 4, 4))
    volume[0] = 1.0
    volume[3] = 3.0
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[3] = True
    assert energy_in_region(volume, mask) == pytest.approx(0.75)
    assert np.isnan(energy_in_region(np.zeros(4), np.ones(4, dtype=bool)))
    empty = check_forbidden_region(np.zeros(4), np.ones(4, dtype=bool))
    assert not empty.exceeded and "empty" in empty.message


# ---------------------------------------------------------------------------- randomisation


def test_randomisation_changes_a_faithful_map_and_spares_the_users_model(blob_model) -> None:
    model, x = blob_model
    before = model_state(model)
    rng_before = torch.random.get_rng_state()
    reported: list[tuple[int, int]] = []
    result = randomisation_check(
        model, x, lambda m, inputs: saliency(m, inputs, target=1), keep_maps=True,
        progress=lambda done, total: reported.append((done, total)),
    )
    assert model_state(model) == before  # the user's model was never touched
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # nor the global RNG
    assert [step.layer for step in result.steps] == ["4", "0"]  # classifier first
    assert [len(step.randomised_layers) for step in result.steps] == [1, 2]  # cascading
    assert not result.barely_changes and result.message.startswith("passed")
    assert result.steps[-1].spearman < 0.3
    assert result.steps[-1].ssim < 0.5
    assert result.steps[0].saliency_map.shape == result.original_map.shape
    assert reported[-1] == (3, 3)
    np.testing.assert_allclose(result.original_map, saliency(model, x, target=1), rtol=1e-6)


def test_randomisation_flags_a_map_that_ignores_the_model(blob_model) -> None:
    """An 'explainer' that returns the input itself is an edge detector in disguise."""
    model, x = blob_model
    result = randomisation_check(model, x, lambda m, inputs: inputs[:, 0].abs())
    assert result.barely_changes
    assert "barely changes" in result.message
    assert all(step.spearman == pytest.approx(1.0) for step in result.steps)
    assert all(step.ssim == pytest.approx(1.0) for step in result.steps)


def test_randomisation_independent_layers_and_explicit_order() -> None:
    torch.manual_seed(0)
    model = build_architecture("resnet_like", spatial_dims=1, widths=(4, 8)).eval()
    x = torch.randn(2, 1, 32)
    result = randomisation_check(model, x, lambda m, inputs: saliency(m, inputs, target=0),
                                 layers=["classifier", "features.2"], cascading=False)
    assert [step.randomised_layers for step in result.steps] == [
        ("classifier",), ("features.2",)
    ]
    assert result.steps[0].spearman_per_sample.shape == (2,)
    default = randomisation_check(model, x, lambda m, inputs: saliency(m, inputs, target=0))
    # Reverse execution order; each batch norm is randomised with the convolution before it.
    assert [step.layer for step in default.steps] == [
        "classifier", "features.2.shortcut.0", "features.2.conv2", "features.2.conv1",
        "features.1.conv2", "features.1.conv1", "features.0.0",
    ]
    blocks = randomisation_check(model, x, lambda m, inputs: saliency(m, inputs, target=0),
                                 depth=2)
    assert [step.layer for step in blocks.steps] == [
        "classifier", "features.2", "features.1", "features.0"
    ]


def test_randomisation_with_the_engines_grad_cam() -> None:
    from napari_gradcam import GradCAM

    torch.manual_seed(0)
    model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8, 16)).eval()
    x = torch.randn(2, 1, 32, 32)
    result = randomisation_check(
        model, x, lambda m, inputs: GradCAM(m, "features.3")(inputs, target=0), depth=2
    )
    np.testing.assert_allclose(result.original_map, GradCAM(model, "features.3")(x, target=0),
                               rtol=1e-5, atol=1e-7)
    assert len(result.steps) == 5 and not result.barely_changes
    assert result.steps[-1].spearman < 0.5


def test_randomisation_cancel_and_errors(blob_model) -> None:
    model, x = blob_model
    calls = itertools.count()
    with pytest.raises(Cancelled):
        randomisation_check(model, x, lambda m, inputs: saliency(m, inputs, target=1),
                            should_stop=lambda: next(calls) >= 2)
    with pytest.raises(TypeError, match="callable"):
        randomisation_check(model, x, "saliency")
    with pytest.raises(ValueError, match="not in the model"):
        randomisation_check(model, x, lambda m, inputs: inputs[:, 0], layers=["head"])
    with pytest.raises(ValueError, match="threshold"):
        randomisation_check(model, x, lambda m, inputs: inputs[:, 0], threshold=2.0)


# ---------------------------------------------------------------------------- similarity


def test_ssim_of_identical_maps_is_one_in_every_dimension() -> None:
    rng = np.random.default_rng(0)
    for shape in [(50,), (20, 24), (9, 10, 11)]:
        values = rng.random(shape)
        assert ssim(values, values) == pytest.approx(1.0)
        assert ssim(values, values, window="uniform") == pytest.approx(1.0)
        assert ssim(values, rng.random(shape), data_range=1.0) < 0.3
    assert ssim(np.ones(5), np.ones(5)) == 1.0


@pytest.mark.parametrize("shape", [(40, 36), (12, 13, 14)])
def test_ssim_matches_scikit_image(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(a + 0.2 * rng.standard_normal(shape), 0, 1)
    reference_gauss = structural_similarity(a, b, data_range=1.0, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=True)
    assert ssim(a, b, data_range=1.0) == pytest.approx(reference_gauss, rel=1e-6)
    reference_uniform = structural_similarity(a, b, data_range=1.0, win_size=7)
    assert ssim(a, b, data_range=1.0, window="uniform") == pytest.approx(reference_uniform,
                                                                         rel=1e-6)


def test_rank_and_linear_correlation_and_top_k() -> None:
    rng = np.random.default_rng(2)
    values = rng.random((6, 7))
    assert spearman(values, np.exp(3 * values)) == pytest.approx(1.0)  # monotone: same ranks
    assert spearman(values, -values) == pytest.approx(-1.0)
    assert pearson(values, 2 * values + 1) == pytest.approx(1.0)
    assert pearson(values, np.exp(3 * values)) < 0.999  # not linear
    other = rng.random((6, 7))
    assert pearson(values, other) == pytest.approx(np.corrcoef(values.ravel(), other.ravel())[0, 1])
    assert np.isnan(spearman(values, np.ones_like(values)))
    # Top 2 of 4: {2, 3} vs {1, 3} share one of three elements.
    assert top_k_iou([0, 1, 5, 9], [0, 8, 1, 9], top_k=0.5) == pytest.approx(1 / 3)
    result = agreement(values, np.exp(values), top_k=0.2)
    assert result.spearman == pytest.approx(1.0) and result.top_k_iou == pytest.approx(1.0)
    np.testing.assert_allclose(normalise_map(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])


# ---------------------------------------------------------------------------- contracts


@pytest.mark.filterwarnings("ignore:the model was in training mode")
def test_cancel_and_progress_leave_the_model_as_found() -> None:
    model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8))
    model.train()
    model.features[0].eval()
    before = model_state(model)
    x = torch.randn(1, 1, 12, 12)
    calls = itertools.count()
    reported: list[tuple[int, int]] = []
    with pytest.raises(Cancelled, match="stopped"):
        deletion_insertion(model, x, np.ones((12, 12)), target=0, steps=10, batch_size=4,
                           should_stop=lambda: next(calls) >= 2,
                           progress=lambda done, total: reported.append((done, total)))
    assert model_state(model) == before
    assert reported == [(4, 22), (8, 22)]  # (1 + 1 random) orders x 11 steps
    region_test(model, x, np.eye(12, dtype=bool), target=0)
    assert model_state(model) == before


def test_bad_inputs_get_clear_errors(blob_model) -> None:
    model, x = blob_model
    with pytest.raises(ValueError, match="must have shape"):
        deletion_insertion(model, x, np.ones((8, 8)), target=1)
    with pytest.raises(ValueError, match="mode"):
        deletion_insertion(model, x, np.ones((len(x), SIZE, SIZE)), mode="erase")
    with pytest.raises(ValueError, match="removal"):
        deletion_insertion(model, x, np.ones((len(x), SIZE, SIZE)), removal="noise")
    with pytest.raises(ValueError, match="empty"):
        region_test(model, x, np.zeros((SIZE, SIZE), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        region_test(model, x, np.full((SIZE, SIZE), 0.5))
    with pytest.raises(ValueError, match="spatial shape"):
        region_test(model, x, np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="fill"):
        region_test(model, x, CORNER, fill="smudge")
    with pytest.raises(ValueError, match="whole input"):
        region_test(model, x, np.ones((SIZE, SIZE), dtype=bool), fill="inpaint")
    with pytest.raises(ValueError, match="does not match"):
        energy_in_region(np.ones((SIZE, SIZE)), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="threshold"):
        check_forbidden_region(np.ones(4), np.ones(4, dtype=bool), threshold=1.5)
    with pytest.raises(ValueError, match="same shape"):
        agreement(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="top_k"):
        agreement(np.arange(4.0), np.arange(4.0), top_k=0.0)
