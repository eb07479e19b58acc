"""Feature taps: a model's intermediate outputs, by module name, through forward hooks.

Names are those of `model.named_modules()` ("features.0", "layer2.1.conv2") and are resolved
once, when the taps are made: an unknown name fails there, before any training, with the
closest valid names, rather than mid-forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdq.errors import KdqError, suggest


class FeatureTaps:
    """Forward hooks on the modules `names` of `model`; after each forward pass `features[name]`
    holds that module's output (with its graph: a loss on it trains the layers below).

        taps = FeatureTaps(student, ["features.1"])
        logits = student(x)
        hint = taps.features["features.1"]
        taps.remove()  # or: with FeatureTaps(...) as taps: ...
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, inputs: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                valid = [n for n in modules if n]
                raise KdqError(f"{type(model).__name__} has no module {name!r}{suggest(name, valid)}; "
                               f"its modules: {_listing(valid)}")
        self.names = list(names)
        self.inputs = inputs  # keep what each module receives (its first input), not what it returns
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in self.names]

    def _keeper(self, name: str):  # noqa: ANN202 - a forward hook
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            kept = inputs[0] if self.inputs else output
            # an int8 model's layers hand on quantized tensors: the losses read float values
            self.features[name] = kept.dequantize() if getattr(kept, "is_quantized", False) else kept
        return keep

    def remove(self) -> None:
        """Take the hooks off the model and drop the features kept (and the graph they hold)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _listing(names: list[str], limit: int = 12) -> str:
    """The first `limit` names, then how many more: a deep network has hundreds."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")
