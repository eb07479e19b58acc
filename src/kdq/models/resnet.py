"""CIFAR-style ResNets, the 6n+2 family of He et al. 2016 ("Deep Residual Learning", sec. 4.2).

Three stages of n BasicBlocks with 16, 32 and 64 channels (times `width`); the second and
third stages halve the resolution, so 32x32 ends at 8x8 and 8x8 still ends at 2x2. Where a
block changes shape its shortcut is a 1x1 conv + BN (the paper's option B), which keeps
everything a plain conv that quantization and pruning understand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError
from kdq.models.registry import (
    check_bool,
    check_int,
    check_positive,
    conv_bn,
    init_weights,
    register_model,
)


class BasicBlock(nn.Module):
    """relu(conv-bn-relu -> conv-bn  +  shortcut(x))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, stride=stride)
        self.conv2 = conv_bn(out_ch, out_ch, act=None)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = conv_bn(in_ch, out_ch, kernel=1, stride=stride, act=None)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet of `depth` = 6n+2 layers.

    `width` multiplies every channel count; `zero_init_residual` zeroes the last BN of each
    block so every block starts as the identity (Goyal et al. 2017), which helps deep nets
    train with large batches. Feature layers: `layer1`, `layer2`, `layer3`; classifier: `fc`.
    """

    def __init__(
        self,
        depth: int,
        /,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_int("depth", depth, low=8)
        if (depth - 2) % 6:
            raise KdqError(f"resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        width = check_positive("width", width)
        channels = [max(1, round(c * width)) for c in (16, 32, 64)]

        self.stem = conv_bn(check_int("in_channels", in_channels), channels[0])
        self.layer1 = self._stage(channels[0], channels[0], blocks, stride=1)
        self.layer2 = self._stage(channels[0], channels[1], blocks, stride=2)
        self.layer3 = self._stage(channels[1], channels[2], blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], check_int("num_classes", num_classes))

        init_weights(self)
        if check_bool("zero_init_residual", zero_init_residual):
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2[1].weight)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        # Only the first block of a stage changes resolution or width.
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def feature_layers(self) -> list[str]:
        """Stage outputs for feature distillation: 1x, 1/2 and 1/4 of the input resolution."""
        return ["layer1", "layer2", "layer3"]


@register_model("resnet8", description="CIFAR ResNet-8 (6n+2, n=1), 0.08M params")
def resnet8(**kwargs: Any) -> ResNet:
    return ResNet(8, **kwargs)


@register_model("resnet14", description="CIFAR ResNet-14 (n=2), 0.18M params")
def resnet14(**kwargs: Any) -> ResNet:
    return ResNet(14, **kwargs)


@register_model("resnet20", description="CIFAR ResNet-20 (n=3), 0.27M params")
def resnet20(**kwargs: Any) -> ResNet:
    return ResNet(20, **kwargs)


@register_model("resnet32", description="CIFAR ResNet-32 (n=5), 0.47M params")
def resnet32(**kwargs: Any) -> ResNet:
    return ResNet(32, **kwargs)


@register_model("resnet44", description="CIFAR ResNet-44 (n=7), 0.66M params")
def resnet44(**kwargs: Any) -> ResNet:
    return ResNet(44, **kwargs)


@register_model("resnet56", description="CIFAR ResNet-56 (n=9), 0.86M params")
def resnet56(**kwargs: Any) -> ResNet:
    return ResNet(56, **kwargs)


@register_model("resnet110", description="CIFAR ResNet-110 (n=18), 1.7M params")
def resnet110(**kwargs: Any) -> ResNet:
    return ResNet(110, **kwargs)
