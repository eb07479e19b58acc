"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

Pre-activation blocks (BN-ReLU-conv, He et al. 2016b) in three groups of (d-4)/6 blocks with
16k, 32k and 64k channels after a 16-channel stem; optional dropout between the two convs of
each block, as in the paper. Inside a block conv1 -> BN -> ReLU are adjacent, so they fuse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError
from kdq.models.registry import check_dropout, check_int, conv_bn, init_weights, register_model


class PreActBlock(nn.Module):
    """x' = relu(bn(x)); out = conv2(dropout(conv-bn-relu(x'))) + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True))
        self.conv1 = conv_bn(in_ch, out_ch, stride=stride)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        # As in the paper's code, a projection shortcut reads the pre-activated input, while
        # an identity shortcut carries the raw input. The choice is fixed at construction, so
        # forward has no data-dependent branch and stays FX-traceable.
        self.project = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preact(x)
        out = self.conv2(self.dropout(self.conv1(a)))
        return out + self.shortcut(a if self.project else x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen` with depth = 6n+4.

    Feature layers: `layer1`, `layer2`, `layer3` (pre-activation outputs: the final BN-ReLU
    lives in `head`); classifier: `fc`.
    """

    def __init__(
        self,
        depth: int,
        widen: int,
        /,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("depth", depth, low=10)
        if (depth - 4) % 6:
            raise KdqError(f"wide resnet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widen = check_int("widen", widen)
        dropout = check_dropout(dropout)
        channels = [16 * widen, 32 * widen, 64 * widen]

        self.stem = nn.Conv2d(check_int("in_channels", in_channels), 16, 3, padding=1, bias=False)
        self.layer1 = self._stage(16, channels[0], blocks, 1, dropout)
        self.layer2 = self._stage(channels[0], channels[1], blocks, 2, dropout)
        self.layer3 = self._stage(channels[1], channels[2], blocks, 2, dropout)
        self.head = nn.Sequential(nn.BatchNorm2d(channels[2]), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], check_int("num_classes", num_classes))
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [PreActBlock(in_ch, out_ch, stride, dropout)]
        layers += [PreActBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def feature_layers(self) -> list[str]:
        """Group outputs for feature distillation, at 1x, 1/2 and 1/4 of the input resolution."""
        return ["layer1", "layer2", "layer3"]


@register_model("wrn-16-1", description="Wide ResNet WRN-16-1, 0.18M params")
def wrn_16_1(**kwargs: Any) -> WideResNet:
    return WideResNet(16, 1, **kwargs)


@register_model("wrn-16-2", description="Wide ResNet WRN-16-2, 0.69M params")
def wrn_16_2(**kwargs: Any) -> WideResNet:
    return WideResNet(16, 2, **kwargs)


@register_model("wrn-16-4", description="Wide ResNet WRN-16-4, 2.7M params")
def wrn_16_4(**kwargs: Any) -> WideResNet:
    return WideResNet(16, 4, **kwargs)


@register_model("wrn-28-10", description="Wide ResNet WRN-28-10, 36.5M params (slow on CPU)")
def wrn_28_10(**kwargs: Any) -> WideResNet:
    return WideResNet(28, 10, **kwargs)


@register_model("wrn-40-2", description="Wide ResNet WRN-40-2, 2.2M params")
def wrn_40_2(**kwargs: Any) -> WideResNet:
    return WideResNet(40, 2, **kwargs)
