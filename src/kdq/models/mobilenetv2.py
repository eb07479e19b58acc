"""MobileNetV2 (Sandler et al. 2018) adapted to 8-32 pixel images.

ImageNet's version downsamples 32x before pooling, which would reduce a 32x32 image to 1x1
by the third stage. Like the common CIFAR adaptations, the stem and the 24-channel stage keep
stride 1, so three stride-2 stages take 32x32 to 4x4 (28x28 to 4x4, 8x8 to 1x1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdq.models.registry import (
    check_bool,
    check_dropout,
    check_int,
    check_positive,
    conv_bn,
    init_weights,
    register_model,
)

# (expansion t, output channels c, blocks n, first stride s), the paper's table 2 with the
# 24-channel stage's stride 2 -> 1.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor` without losing more than 10% of it.

    Multiples of 8 keep vectorised (and int8) kernels fully used; same rule as the reference.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, + x if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [conv_bn(in_ch, hidden, kernel=1, act=nn.ReLU6)]
        layers += [
            conv_bn(hidden, hidden, stride=stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, out_ch, kernel=1, act=None),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch  # fixed at construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    `width_mult` scales every stage's channels (rounded to multiples of 8); the 1280-channel
    head only grows, never shrinks, as in the paper. `dropout` is applied before `fc`.
    `zero_init_residual` zeroes the projection BN of blocks with a residual connection.
    Feature layers: `stage2` (1x), `stage3` (1/2), `stage5` (1/4), `stage7` (1/8 of the input).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        width_mult = check_positive("width_mult", width_mult)
        in_ch = make_divisible(32 * width_mult)
        self.stem = conv_bn(check_int("in_channels", in_channels), in_ch, act=nn.ReLU6)
        for i, (t, c, n, s) in enumerate(STAGES, start=1):
            out_ch = make_divisible(c * width_mult)
            # Only a stage's first block changes resolution or width.
            blocks = [InvertedResidual(in_ch, out_ch, s, t)]
            blocks += [InvertedResidual(out_ch, out_ch, 1, t) for _ in range(n - 1)]
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
            in_ch = out_ch
        last = make_divisible(1280 * max(1.0, width_mult))
        self.head = conv_bn(in_ch, last, kernel=1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(last, check_int("num_classes", num_classes))

        init_weights(self)
        if check_bool("zero_init_residual", zero_init_residual):
            for m in self.modules():
                if isinstance(m, InvertedResidual) and m.use_residual:
                    nn.init.zeros_(m.conv[-1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = self.head(self.stage7(self.stage6(self.stage5(x))))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))

    def feature_layers(self) -> list[str]:
        """The last stage at each resolution, for feature distillation."""
        return ["stage2", "stage3", "stage5", "stage7"]


@register_model("mobilenetv2", description="MobileNetV2 1.0x for small images, 2.2M params")
def mobilenetv2(**kwargs: Any) -> MobileNetV2:
    return MobileNetV2(**kwargs)


@register_model("mobilenetv2-x0.5", description="MobileNetV2 0.5x for small images, 0.7M params")
def mobilenetv2_x0_5(width_mult: float = 0.5, **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(width_mult=width_mult, **kwargs)


@register_model("mobilenetv2-x0.35", description="MobileNetV2 0.35x for small images, 0.4M params")
def mobilenetv2_x0_35(width_mult: float = 0.35, **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(width_mult=width_mult, **kwargs)
