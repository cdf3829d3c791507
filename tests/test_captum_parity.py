"""Our input attributions equal Captum's on the same model, input, target and settings.

Captum (Kokhlikyan et al. 2020) is the reference implementation most papers cite; matching it
to 1e-5 means a number from this package can be compared with one from Captum. Settings are
translated, not guessed: Captum's ``n_steps`` counts points (our trapezoid rule uses
``steps + 1`` of them), its SmoothGrad noise is drawn inside ``NoiseTunnel`` from the global
generator (so the same draw is repeated and passed to ours as ``noise=``), and its occlusion
window spans the channels explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.attribution import (
    integrated_gradients,
    occlusion,
    saliency,
    smoothgrad,
)

captum_attr = pytest.importorskip("captum.attr")

TOLERANCE = {"rtol": 1e-5, "atol": 1e-8}


@pytest.fixture
def model_and_input():
    """A small residual CNN in float64 (so both sides round alike) and two 2-channel images."""
    torch.manual_seed(0)
    model = ResNetLike(2, in_channels=2, num_classes=3, widths=(4, 8)).double().eval()
    x = torch.rand(2, 2, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def _close(ours: np.ndarray, theirs: torch.Tensor) -> None:
    theirs_np = theirs.detach().numpy()
    assert np.abs(theirs_np).max() > 0
    scale = np.abs(theirs_np).max()
    np.testing.assert_allclose(ours, theirs_np, rtol=TOLERANCE["rtol"],
                               atol=TOLERANCE["atol"] * scale)


def test_saliency_equals_captum(model_and_input):
    model, x = model_and_input
    theirs = captum_attr.Saliency(model).attribute(x, target=1, abs=True)
    _close(saliency(model, x, target=1, reduce_channels=False), theirs)
    signed = captum_attr.Saliency(model).attribute(x, target=2, abs=False)
    _close(saliency(model, x, target=2, reduce_channels=False, absolute=False), signed)


def test_smoothgrad_with_the_same_noise_equals_captum(model_and_input):
    model, x = model_and_input
    samples, stdev = 5, 0.2
    torch.manual_seed(42)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=0)
    # NoiseTunnel draws torch.normal(0, stdev) of shape (N * samples, C, H, W), sample-major
    torch.manual_seed(42)
    drawn = torch.normal(0, torch.tensor(stdev).repeat((2 * samples, *x.shape[1:])))
    noise = drawn.reshape(2, samples, *x.shape[1:])
    ours = smoothgrad(model, x, target=0, noise=noise, reduce_channels=False, batch_size=3)
    _close(ours, theirs)


def test_occlusion_equals_captum(model_and_input):
    model, x = model_and_input
    # 12 = 2 + 5 × 2: the windows tile exactly, so neither side adds a flush window
    theirs = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(2, 4, 4), strides=(2, 2, 2), baselines=0.3, target=2)
    ours = occlusion(model, x, target=2, patch=4, stride=2, baseline=0.3, batch_size=7)
    _close(ours, theirs[:, 0])
    _close(ours, theirs[:, 1])  # a window spans both channels: the same value in each


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle",
                                    "riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_and_delta_equal_captum(model_and_input, method):
    model, x = model_and_input
    steps = 6
    n_steps = steps + 1 if method == "riemann_trapezoid" else steps
    theirs, their_delta = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=0.1, target=1, n_steps=n_steps, method=method,
        return_convergence_delta=True)
    ours, delta = integrated_gradients(model, x, target=1, baseline=0.1, steps=steps,
                                       method=method, reduce_channels=False,
                                       return_convergence_delta=True, batch_size=5)
    _close(ours, theirs)
    np.testing.assert_allclose(delta, their_delta.detach().numpy(), rtol=1e-4, atol=1e-8)
