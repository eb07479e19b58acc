"""Type and range checks for the JSON kdq reads back from files (model.json, quantized.json,
packed.json, ONNX metadata): every file is untrusted, and a size read from one is checked
against a limit before anything is built from it.

Each failure is one KdqError naming the file, the place in it and the fix, e.g.
`runs/q/quantized.json: recipe.input_shape[1] must be an integer in 1..4096, got 200000.0; ...`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

from kdq.errors import KdqError, short_repr

DAMAGED = "the run directory is damaged; retrain it or rerun with --resume/--overwrite"
MAX_CLASSES = 100_000
MAX_DIM = 4096  # one input dimension (channels, height, width)
MAX_INPUT_ELEMENTS = 1 << 24  # one sample: 16 M values, 64 MB as float32
MAX_FEATURES = MAX_INPUT_ELEMENTS  # in_channels of a vector model is its feature count
MAX_LAYERS = 100_000  # layers a pruned model's widths may name (the largest zoo model has a few hundred)
MAX_NAME = 1000  # characters in one module name
MAX_WIDTH = 1 << 24  # one layer's channel or feature count
WIDTH_KEYS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
_REQUIRED = object()


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Checker:
    """Checks on one JSON document read from `source`; `fix` ends every error message."""

    def __init__(self, source: str | Path, fix: str = DAMAGED) -> None:
        self.source = str(source)
        self.fix = fix

    def fail(self, path: str, problem: str) -> NoReturn:
        where = f"{self.source}: {path}" if path else self.source
        raise KdqError(f"{where} {problem}; {self.fix}")

    def expect(self, ok: bool, value: Any, path: str, expected: str) -> None:
        if not ok:
            self.fail(path, f"must be {expected}, got {short_repr(value)}")

    def mapping(self, value: Any, path: str = "") -> dict[str, Any]:
        self.expect(isinstance(value, dict), value, path, "a JSON object")
        return value

    def key(self, obj: dict[str, Any], key: str, path: str = "", *, default: Any = _REQUIRED) -> Any:
        """`obj[key]` (obj at `path`), or `default`; a missing required key is an error."""
        if key in obj:
            return obj[key]
        if default is _REQUIRED:
            self.fail(_join(path, key), "is missing")
        return default

    def string(self, value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
        self.expect(isinstance(value, str), value, path, "a string")
        if choices is not None:
            self.expect(value in choices, value, path, f"one of {', '.join(choices)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        self.expect(isinstance(value, bool), value, path, "true or false")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        self.expect(ok, value, path, f"an integer in {low}..{high}")
        return value

    def number(self, value: Any, path: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        self.expect(ok, value, path, "a finite number")
        return float(value)

    def items(self, value: Any, path: str, low: int, high: int) -> list[Any]:
        """A list of `low..high` items (the items themselves unchecked)."""
        self.expect(isinstance(value, list), value, path, "a list")
        self.expect(low <= len(value) <= high, f"{len(value)} items", path, f"a list of {low}..{high} items")
        return value

    def strings(self, value: Any, path: str, low: int, high: int) -> list[str]:
        return [self.string(v, _join(path, i)) for i, v in enumerate(self.items(value, path, low, high))]

    def numbers(self, value: Any, path: str, low: int, high: int) -> list[float]:
        return [self.number(v, _join(path, i)) for i, v in enumerate(self.items(value, path, low, high))]

    def shape(self, value: Any, path: str, dims: tuple[int, int] = (1, 3), max_dim: int = MAX_DIM,
              max_elements: int = MAX_INPUT_ELEMENTS) -> list[int]:
        """A tensor shape: `dims` sizes, each in 1..max_dim, whose product is at most `max_elements`."""
        sizes = [self.integer(v, _join(path, i), 1, max_dim) for i, v in enumerate(self.items(value, path, *dims))]
        self.expect(math.prod(sizes) <= max_elements, sizes, path, f"a shape of at most {max_elements:,} elements")
        return sizes

    # ---- the parts several kdq files share

    def model_spec(self, value: Any, path: str) -> dict[str, Any]:
        """How `create_model` rebuilds a zoo model: name, num_classes, in_channels, kwargs."""
        spec = self.mapping(value, path)
        self.string(self.key(spec, "name", path), _join(path, "name"))
        self.integer(self.key(spec, "num_classes", path), _join(path, "num_classes"), 1, MAX_CLASSES)
        self.integer(self.key(spec, "in_channels", path), _join(path, "in_channels"), 1, MAX_FEATURES)
        self.mapping(self.key(spec, "kwargs", path, default={}), _join(path, "kwargs"))
        if "widths" in spec:
            self.widths(spec["widths"], _join(path, "widths"))
        unknown = set(spec) - {"name", "num_classes", "in_channels", "kwargs", "widths"}
        if unknown:
            self.fail(_join(path, sorted(unknown)[0]),
                      "is not a model spec key (name, num_classes, in_channels, kwargs, widths)")
        return spec

    def widths(self, value: Any, path: str) -> dict[str, dict[str, int]]:
        """A pruned model's layer sizes (kdq.models.widths): names -> {size name: integer}.

        Only the form and the bounds here; whether each name is a layer of the model and each
        size at most the unpruned layer's is checked when the model is built.
        """
        widths = self.mapping(value, path)
        self.expect(len(widths) <= MAX_LAYERS, f"{len(widths)} layers", path, f"at most {MAX_LAYERS} layers")
        for name, sizes in widths.items():
            where = f"{path}[{short_repr(name)}]"
            self.expect(len(name) <= MAX_NAME, name, where, f"a layer name of at most {MAX_NAME} characters")
            sizes = self.mapping(sizes, where)
            for key, size in sizes.items():
                self.string(key, f"{where} key", WIDTH_KEYS)
                self.integer(size, f"{where}.{key}", 1, MAX_WIDTH)
        return widths

    def data_fields(self, meta: dict[str, Any], path: str = "", required: bool = True) -> None:
        """The data description a saved model carries: classes, mean, std, input_shape, dataset."""
        default = _REQUIRED if required else None
        classes = self.key(meta, "classes", path, default=default)
        if classes is not None:
            self.strings(classes, _join(path, "classes"), 1, MAX_CLASSES)
        stats = {}
        for name in ("mean", "std"):
            values = self.key(meta, name, path, default=default)
            if values is not None:
                stats[name] = self.numbers(values, _join(path, name), 1, MAX_FEATURES)
        shape = self.key(meta, "input_shape", path, default=default)
        if shape is not None:
            shape = self.shape(shape, _join(path, "input_shape"))
            # one value per image channel or per feature of a vector (or one for all of them)
            width = shape[0] if len(shape) == 3 else math.prod(shape)
            for name, values in stats.items():
                self.expect(len(values) in (1, width), f"{len(values)} values", _join(path, name),
                            f"{width} values, one per channel of input_shape {shape}")
        dataset = self.key(meta, "dataset", path, default=None)
        if dataset is not None:
            self.string(dataset, _join(path, "dataset"))
