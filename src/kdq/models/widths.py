"""A channel-pruned model as plain data: the new width of every layer that lost channels.

Pruning removes channels from a zoo model in place, so the model no longer matches what
`create_model` builds from its name. `read_widths` compares it with a fresh build of the same
spec and records, for each convolution, linear and batch-norm layer that changed, its new
sizes; `apply_widths` rebuilds those layers at the recorded sizes. The record is JSON, kept in
`model.kdq_spec["widths"]`, so a pruned run reloads without pickle:

    {"layer1.0.conv1.0": {"in_channels": 16, "out_channels": 8, "groups": 1},
     "layer1.0.conv1.1": {"num_features": 8}, "fc": {"in_features": 32, "out_features": 10}}

A record read from a file is untrusted: every name must be a layer of the same type, every
size an integer between 1 and the unpruned layer's, so a file can never make kdq allocate
more than the unpruned model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError, short_repr, suggest

# The layer types whose widths kdq records, and the constructor arguments that hold them.
# Exact types only: a subclass may take other constructor arguments.
FIELDS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
}
FIX = "the pruned model's record is damaged; prune the model again"


def read_widths(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """The sizes of every layer of `model` that differs from the same-named layer of `reference`.

    `reference` is a freshly built model of the same spec (it may live on the "meta" device).
    A changed module of another type (a LayerNorm, a user's layer) cannot be recorded and
    raises KdqError: such a model could not be rebuilt from its record.
    """
    ref = dict(reference.named_modules())
    widths: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        original = ref.get(name)
        if original is None or type(original) is not type(module):
            raise KdqError(f"layer {name!r} of the pruned model is not in a fresh {type(reference).__name__}; "
                           "kdq records widths only for models whose structure pruning kept")
        fields = FIELDS.get(type(module))
        if fields is not None:
            sizes = {f: int(getattr(module, f)) for f in fields}
            if sizes != {f: int(getattr(original, f)) for f in fields}:
                widths[name] = sizes
        elif _own_shapes(module) != _own_shapes(original):
            raise KdqError(f"layer {name!r} ({type(module).__name__}) changed shape; kdq records the widths of "
                           "Conv2d, Linear and BatchNorm layers only: skip it when pruning")
    return widths


def _own_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(n, tuple(t.shape)) for n, t in tensors]


def apply_widths(model: nn.Module, widths: Any) -> nn.Module:
    """Replace each layer named in `widths` by a new one of the recorded sizes; return `model`.

    Every other constructor argument (kernel size, stride, padding, bias, eps, momentum, ...)
    is copied from the layer replaced. The new layers are freshly initialised: load the pruned
    weights afterwards. Every name, type and size is checked first, so a bad record changes
    nothing and fails as one KdqError line.
    """
    if not isinstance(widths, dict):
        raise KdqError(f"widths must be a mapping of layer names to sizes, got {short_repr(widths)}; {FIX}")
    modules = dict(model.named_modules())
    planned = [(name, modules.get(name) if isinstance(name, str) else None, sizes) for name, sizes in widths.items()]
    for name, module, sizes in planned:
        _check_entry(name, module, sizes, modules)
    for name, module, sizes in planned:
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name], attr, _rebuilt(module, sizes))
    return model


def _check_entry(name: Any, module: nn.Module | None, sizes: Any, modules: dict[str, nn.Module]) -> None:
    if module is None or name == "":
        layers = [n for n, m in modules.items() if type(m) in FIELDS]
        raise KdqError(f"widths name {short_repr(name)}, which is no layer of the model"
                       f"{suggest(str(name), layers)}; {FIX}")
    fields = FIELDS.get(type(module))
    if fields is None:
        raise KdqError(f"widths[{name!r}] names a {type(module).__name__}; only Conv2d, Linear and "
                       f"BatchNorm widths are recorded; {FIX}")
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(fields):
        raise KdqError(f"widths[{name!r}] must give exactly {', '.join(fields)} for a {type(module).__name__}, "
                       f"got {short_repr(sizes)}; {FIX}")
    for field in fields:
        value, original = sizes[field], getattr(module, field)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= original:
            raise KdqError(f"widths[{name!r}].{field} must be an integer in 1..{original} (the unpruned "
                           f"layer's size), got {short_repr(value)}; {FIX}")
    if "groups" in sizes and (sizes["in_channels"] % sizes["groups"] or sizes["out_channels"] % sizes["groups"]):
        raise KdqError(f"widths[{name!r}]: groups {sizes['groups']} must divide in_channels {sizes['in_channels']} "
                       f"and out_channels {sizes['out_channels']}; {FIX}")


def _rebuilt(module: nn.Module, sizes: dict[str, int]) -> nn.Module:
    """A new layer of `module`'s type at `sizes`, its other settings copied, on its device."""
    factory = _factory(module)
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(sizes["in_channels"], sizes["out_channels"], module.kernel_size, module.stride,
                         module.padding, module.dilation, sizes["groups"], module.bias is not None,
                         module.padding_mode, **factory)
    if isinstance(module, nn.Linear):
        return nn.Linear(sizes["in_features"], sizes["out_features"], module.bias is not None, **factory)
    return type(module)(sizes["num_features"], module.eps, module.momentum, module.affine,
                        module.track_running_stats, **factory)


def _factory(module: nn.Module) -> dict[str, Any]:
    """The device and float dtype of `module`'s own tensors (none: PyTorch's defaults)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if not tensors:
        return {}
    # a BN's step counter is an int64 buffer: the dtype comes from its float tensors
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return {"device": tensors[0].device, "dtype": floats[0] if floats else torch.get_default_dtype()}


def check_fits(model: nn.Module, input_shape: Any) -> None:
    """Run one zero sample through a model rebuilt from widths: sizes that do not fit together
    (one layer's outputs another's inputs) fail here as one line, not in the middle of a run."""
    was_training = model.training
    model.eval()
    try:
        first = next(iter([*model.parameters(), *model.buffers()]), None)
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=None if first is None else first.device))
    except (RuntimeError, ValueError, IndexError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise KdqError(f"the recorded layer widths do not fit together ({line}); {FIX}") from None
    finally:
        model.train(was_training)
