"""Shared fixtures for the core (Qt-free) tests: small seeded models, nothing napari.

One thread per test process: CI runners and the development machine have 2 shared cores, and
these models are so small that threading only adds overhead.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.core.architectures import ResNetLike, UNet

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_widget_choices(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test remembers the explainer's choices in a folder of its own: no test reads a
    user's choices, or another test's (a restored model or mode would make tests depend on
    their order)."""
    monkeypatch.setenv("NAPARI_GRADCAM_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class GapLinear(nn.Module):
    """conv (1x1) → ReLU → global average pool → Linear: the model CAM was defined for.

    With a 1x1 convolution the activations are a per-position matrix product that numpy can
    compute by hand, and dy_c/dA_k(s) = W_ck / Z is constant in space, so Grad-CAM must equal
    ReLU(Σ_k W_ck A_k) / Z exactly.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 2, channels: int = 4,
                 classes: int = 3) -> None:
        super().__init__()
        self.conv = CONV[spatial_dims](in_channels, channels, 1)
        self.relu = nn.ReLU()
        self.pool = GAP[spatial_dims](1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def set_known_weights(model: nn.Module, seed: int, positive: bool = False) -> nn.Module:
    """Overwrite every parameter with seeded normal (or |normal|) values: known, reproducible."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.parameters():
            values = rng.normal(size=tuple(param.shape))
            param.copy_(torch.from_numpy(np.abs(values) if positive else values))
    return model


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 1x1 convolution by hand: x (N, C, *s), weight (K, C, 1, ...), bias (K,) → (N, K, *s)."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    out = np.einsum("kc,nc...->nk...", w, x)
    return out + bias.reshape(1, -1, *(1,) * (x.ndim - 2))


@pytest.fixture(scope="session")
def hand() -> SimpleNamespace:
    """The by-hand helpers above, as a fixture (so no test imports ``conftest`` by name)."""
    return SimpleNamespace(GapLinear=GapLinear, set_known_weights=set_known_weights, relu=relu,
                           conv1x1=conv1x1, CONV=CONV, GAP=GAP)


@pytest.fixture
def resnet2d() -> nn.Module:
    """The built-in residual classifier, seeded, eval mode, 1 grey channel, 3 classes."""
    torch.manual_seed(0)
    return ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16, 16)).eval()


@pytest.fixture
def unet2d() -> nn.Module:
    """The built-in U-Net, seeded, eval mode: per-pixel logits (N, 3, H, W)."""
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16, 16)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Two different grey 16x16 images (seeded)."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 16, 16, generator=generator)
