"""The model registry, `create_model`, and the few pieces every model family shares.

A variant is a short function registered with `@register_model`. It returns an instance of
its family's class and forwards `**kwargs` to it. The options a user may pass to
`create_model` are the keyword-only parameters of that class (found through the variant's
return annotation) plus any keyword parameters the variant declares itself to give them its
own default. The family class's positional-only parameters (a ResNet's depth, a WRN's depth
and widen factor) are fixed by the variant's name and cannot be overridden.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

import torch
from torch import nn

from kdq.errors import KdqError, short_repr, suggest
from kdq.models.widths import apply_widths
from kdq.registry import Registry

InputKind = Literal["image", "vector"]
INPUT_KINDS = ("image", "vector")
# create_model passes these itself; they are not per-model options.
_COMMON = ("num_classes", "in_channels")
# The largest model create_model builds: 2e9 float32 parameters are 8 GB of weights alone,
# and as much again for each optimizer buffer; a larger request is a typo (width=1000000).
MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class ModelEntry:
    """What the registry holds for one model name."""

    fn: Callable[..., nn.Module]
    input_kind: InputKind
    description: str

    def options(self) -> dict[str, Any]:
        """The keyword options this model accepts, with their defaults for this variant."""
        sig = inspect.signature(self.fn)
        opts: dict[str, Any] = {}
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            family = get_type_hints(self.fn).get("return")
            if isinstance(family, type):
                for p in inspect.signature(family).parameters.values():
                    if p.kind is p.KEYWORD_ONLY:
                        opts[p.name] = p.default
        # The variant's own parameters come second so that its defaults win.
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                opts[p.name] = p.default
        for name in _COMMON:
            opts.pop(name, None)
        return opts


MODELS: Registry[ModelEntry] = Registry(
    "model", "kdq models", "; a model of your own: pass `kdq --import MODULE` naming the module that registers it"
)


def register_model(
    name: str, input_kind: InputKind = "image", description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a variant function under `name`; the function itself is returned."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"model {name!r}: input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name)(ModelEntry(fn, input_kind, description))
        return fn

    return decorator


def model_info(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name raises KdqError with close matches."""
    return MODELS.get(name)


def check_registered(name: str, source: str, cls: Any = None) -> None:
    """KdqError when `source` (a saved run) names a model no imported module has registered.

    kdq never imports a module named in a file: the user names it with `kdq --import MODULE`.
    """
    if name not in MODELS:
        what = f" (class {short_repr(cls)})" if isinstance(cls, str) else ""
        raise KdqError(
            f"{source} holds model {short_repr(name)}{what}, which no imported module registers; "
            "pass the module that registers it: `kdq --import MODULE ...` (on PYTHONPATH)"
        )


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return MODELS.names(pattern)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, *, widths: dict[str, dict[str, int]] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model and record how to rebuild it in `model.kdq_spec`.

    For image models `in_channels` is the number of input channels; for vector models it is
    the number of input features. The spec is JSON data, so `create_model(**model.kdq_spec)`
    (its options arrive as the `kwargs` key) rebuilds the same architecture without pickle.
    The options and the size are checked first (see `check_model`), so an absurd width fails
    in one line instead of allocating. `widths` (kdq.models.widths), recorded by channel
    pruning, gives layers their pruned sizes; each is at most the unpruned size.
    """
    entry = model_info(name)
    if isinstance(kwargs.get("kwargs"), dict):  # a spec passed back in with **
        kwargs = {**kwargs.pop("kwargs"), **kwargs}
    check_model(name, num_classes, in_channels, **kwargs)
    # The JSON round trip turns tuples into lists: the spec is exactly what a file gives back.
    spec_kwargs = json.loads(json.dumps(kwargs))
    model = entry.fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.kdq_spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "kwargs": spec_kwargs,
    }
    if widths:  # recorded only when given, so an unpruned model's spec stays as it always was
        apply_widths(model, widths)
        model.kdq_spec["widths"] = json.loads(json.dumps(widths))
    return model


def check_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> int | None:
    """Check a model's options and size without allocating it; return its parameter count.

    Unknown option names, wrong types and out-of-range values fail as one KdqError line. The
    model is then built on PyTorch's "meta" device, which records shapes but holds no data,
    and refused when it has more than MAX_PARAMS parameters. `kdq run` calls this for every
    stage before the first one trains. Returns None for a (user-registered) model that cannot
    be built on "meta" because its constructor reads values: its size is not checked.
    """
    entry = model_info(name)
    allowed = entry.options()
    for key in kwargs:
        if key not in allowed:
            takes = ", ".join(allowed) or "no options"
            raise KdqError(
                f"model {name!r} does not take {short_repr(key)}{suggest(str(key), allowed)}; it takes: {takes}"
            )
    check_int("num_classes", num_classes, low=1)
    check_int("in_channels", in_channels, low=1)
    try:  # YAML and --model-arg values arrive through kdq.io.parse_yaml, whose alias expansion is capped
        json.dumps(kwargs)
    except (TypeError, ValueError) as err:
        raise KdqError(f"model {name!r}: options must be plain JSON values ({err})") from None
    try:
        with torch.device("meta"):
            model = entry.fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except KdqError as err:
        raise KdqError(f"model {name!r}: {err}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as err:
        if isinstance(err, NotImplementedError) or "meta" in str(err).lower():
            return None  # a user's model whose __init__ needs real values (.item(), a QR init): built unchecked
        # e.g. a width so large that a weight's element count overflows
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise KdqError(
            f"model {name!r} cannot be built with options {short_repr(kwargs)} ({first}); lower width/depth"
        ) from None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise KdqError(
            f"model {name!r} with options {short_repr(kwargs)} has {params:.3g} parameters, over kdq's "
            f"limit of {MAX_PARAMS:.0e}; lower width/depth"
        )
    return params


def model_input_size(name: str, input_shape: Sequence[int], dataset: str) -> int:
    """The `in_channels` create_model takes for `name` on data of `input_shape`.

    Image models take the channel count, vector models the number of features; an image
    model on tabular data is refused.
    """
    entry = model_info(name)
    if entry.input_kind == "image":
        if len(input_shape) != 3:
            raise KdqError(f"model {name!r} needs images but data set {dataset!r} is tabular; use mlp or mlp-small")
        return int(input_shape[0])
    return math.prod(input_shape)


# ---- value checks the family classes share: one-line KdqErrors, not deep assertion failures


def check_int(name: str, value: Any, low: int = 1) -> int:
    """`value` as an int >= low, or KdqError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KdqError(f"{name} must be an integer >= {low}, got {short_repr(value)}")
    return value


def check_positive(name: str, value: Any) -> float:
    """`value` as a finite float > 0, or KdqError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise KdqError(f"{name} must be a finite number > 0, got {short_repr(value)}")
    return float(value)


def check_dropout(value: Any) -> float:
    """A dropout probability in [0, 1), or KdqError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise KdqError(f"dropout must be a number in [0, 1), got {short_repr(value)}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a real bool (not 0/1 or "yes"), or KdqError."""
    if not isinstance(value, bool):
        raise KdqError(f"{name} must be true or false, got {short_repr(value)}")
    return value


# ---- layers and initialisation shared by the convolutional families


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv -> BN (-> activation) as one Sequential, so quantization can fuse the three.

    The conv has no bias because the BN that follows would cancel it.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as in He et al. 2015 for ReLU nets), BN to identity.

    Linear layers keep PyTorch's default init, which suits the single classifier layer.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
