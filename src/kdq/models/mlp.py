"""Multi-layer perceptrons for tabular (vector) data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError, short_repr
from kdq.models.registry import check_dropout, check_int, register_model

MAX_HIDDEN_LAYERS = 1000


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden size -> `fc`.

    `in_channels` is the number of input features; inputs are flattened first, so an image
    batch (N, C, H, W) works when in_channels = C*H*W. `hidden=()` gives logistic regression.
    Feature layers: each hidden block, `body.0`, `body.1`, ...
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise KdqError(f"hidden must be a list of layer sizes, e.g. [256, 128], got {short_repr(hidden)}")
        if len(hidden) > MAX_HIDDEN_LAYERS:  # checked before building: a million layers take minutes even on "meta"
            raise KdqError(f"hidden lists {len(hidden)} layers, more than {MAX_HIDDEN_LAYERS}; lower depth")
        sizes = [check_int("in_channels", in_channels)] + [check_int("hidden size", h) for h in hidden]
        p = check_dropout(dropout)
        self.flatten = nn.Flatten()
        # Linear -> ReLU stay adjacent inside each block so quantization can fuse them.
        self.body = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(p))
                for a, b in zip(sizes[:-1], sizes[1:])
            )
        )
        self.fc = nn.Linear(sizes[-1], check_int("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.flatten(x)))

    def feature_layers(self) -> list[str]:
        """The output of every hidden block (empty when there are no hidden layers)."""
        return [f"body.{i}" for i in range(len(self.body))]


@register_model("mlp", input_kind="vector", description="MLP, hidden (256, 128), for tabular data")
def mlp(**kwargs: Any) -> MLP:
    return MLP(**kwargs)


@register_model("mlp-small", input_kind="vector", description="MLP, hidden (64,), for tabular data")
def mlp_small(hidden: Sequence[int] = (64,), **kwargs: Any) -> MLP:
    return MLP(hidden=hidden, **kwargs)
