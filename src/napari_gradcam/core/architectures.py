"""Built-in network architectures, named so that a model card can ask for them.

The demo models and the benchmark use these; a user's own network comes in through a
``module:factory`` entry of a model card instead. One residual classifier serves 1D spectra,
2D micrographs and 3D CT patches (only the convolution type changes), so Grad-CAM behaves the
same way across the three, and one small U-Net serves segmentation (Seg-Grad-CAM).

Layer names are stable on purpose: model cards and tests refer to ``features.3`` (the last
residual stage, the usual Grad-CAM layer) and ``classifier`` (the linear head after global
average pooling, which is what CAM needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (strided, 1x1) shortcut, then ReLU: the ResNet basic block."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        conv, norm = _CONV[spatial_dims], _BATCHNORM[spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetLike(nn.Module):
    """A small ResNet for 1D, 2D or 3D inputs: stem, residual stages, GAP, linear head.

    ``features`` is a Sequential (stem, stage 1, stage 2, ...) so its children are addressable
    as ``features.0`` ... ``features.N``; ``classifier`` is the linear head.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        conv, norm = _CONV[spatial_dims], _BATCHNORM[spatial_dims]
        stem = nn.Sequential(
            conv(in_channels, widths[0], 3, padding=1, bias=False),
            norm(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = [stem]
        previous = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(ResidualBlock(spatial_dims, previous, width, stride=stride))
            previous = width
        self.spatial_dims = spatial_dims
        self.features = nn.Sequential(*stages)
        self.pool = _POOL[spatial_dims](1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        conv, norm = _CONV[spatial_dims], _BATCHNORM[spatial_dims]
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(),
        )


class UNet(nn.Module):
    """A small U-Net (2D by default) that returns per-pixel class logits ``(N, K, *spatial)``.

    Layers: ``down0``..``down{depth}`` (encoder, the last one is the bottleneck), ``up{i}`` and
    ``dec{i}`` (decoder), ``head`` (1x1 conv to the classes). Seg-Grad-CAM usually looks at the
    bottleneck or the first decoder stage. Inputs must be divisible by ``2**depth``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        conv = _CONV[spatial_dims]
        self.depth = len(widths) - 1
        self.spatial_dims = spatial_dims
        self.pool = _MAXPOOL[spatial_dims](2)
        previous = in_channels
        for index, width in enumerate(widths):
            setattr(self, f"down{index}", _DoubleConv(spatial_dims, previous, width))
            previous = width
        transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
        for index in reversed(range(self.depth)):
            wide, narrow = widths[index + 1], widths[index]
            setattr(self, f"up{index}", transposed[spatial_dims](wide, narrow, 2, 2))
            setattr(self, f"dec{index}", _DoubleConv(spatial_dims, 2 * narrow, narrow))
        self.head = conv(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index in range(self.depth):
            x = getattr(self, f"down{index}")(x)
            skips.append(x)
            x = self.pool(x)
        x = getattr(self, f"down{self.depth}")(x)
        for index in reversed(range(self.depth)):
            x = getattr(self, f"up{index}")(x)
            x = getattr(self, f"dec{index}")(torch.cat([x, skips[index]], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet_like": ResNetLike,
    "unet": UNet,
}


def build_architecture(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a built-in architecture by name (as written in a model card)."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {name!r}; built-in architectures: {known}") from None
    return factory(**kwargs)
