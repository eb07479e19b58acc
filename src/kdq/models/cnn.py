"""A plain VGG-style CNN family: the cheap students of the demo.

Three stages of two conv-BN-ReLU layers with `width`, 2x`width` and 4x`width` channels, a 2x2
max-pool between stages (32 -> 16 -> 8, and 8 -> 4 -> 2 for the smallest inputs), then global
average pooling and one linear layer. No residuals: at this depth they buy little, and a
straight chain is the easiest case for quantization and channel pruning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdq.models.registry import check_dropout, check_int, conv_bn, init_weights, register_model


class CNN(nn.Module):
    """Conv-BN-ReLU x2 per stage, three stages, global pool, `fc`.

    Feature layers: `stage1` (1x), `stage2` (1/2), `stage3` (1/4 of the input resolution).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        w = check_int("width", width)
        self.stage1 = nn.Sequential(conv_bn(check_int("in_channels", in_channels), w), conv_bn(w, w))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(4 * w, check_int("num_classes", num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.pool2(self.stage2(self.pool1(self.stage1(x)))))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))

    def feature_layers(self) -> list[str]:
        """Stage outputs (before pooling) for feature distillation."""
        return ["stage1", "stage2", "stage3"]


@register_model("cnn-tiny", description="3-stage conv-BN-ReLU CNN, width 8, 0.02M params")
def cnn_tiny(width: int = 8, **kwargs: Any) -> CNN:
    return CNN(width=width, **kwargs)


@register_model("cnn-small", description="3-stage conv-BN-ReLU CNN, width 16, 0.07M params")
def cnn_small(width: int = 16, **kwargs: Any) -> CNN:
    return CNN(width=width, **kwargs)


@register_model("cnn-medium", description="3-stage conv-BN-ReLU CNN, width 24, 0.16M params")
def cnn_medium(width: int = 24, **kwargs: Any) -> CNN:
    return CNN(width=width, **kwargs)
