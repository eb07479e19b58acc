"""What every recipe shares: the registry, schemes, announcing them, and finished-scheme reuse."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from kdq.engine import distributed
from kdq.errors import KdqError
from kdq.registry import Registry
from kdq.rundir.layout import check_name, read_results

RECIPES = Registry("recipe")
# A recipe's own checks of its options, beyond what every recipe checks (kdq.recipes.check_recipe).
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}
# While kdq.recipes.sweep runs a recipe for one of its seeds: (that seed's index, how many seeds),
# so each scheme's announcement counts over the whole sweep without every recipe taking an option.
_SEED_POSITION: ContextVar[tuple[int, int]] = ContextVar("kdq_recipe_seed_position", default=(0, 1))


def schemes(bits: Any) -> list[str]:
    """`bits` as a list of distinct schemes, each usable as a folder name."""
    found = [bits] if isinstance(bits, str) else bits
    if not isinstance(found, (list, tuple)) or not found or not all(isinstance(s, str) for s in found):
        raise KdqError(f"bits must be a scheme such as w4a4 or a list of them, got {bits!r}")
    if len(set(found)) != len(found):
        raise KdqError(f"bits lists a scheme twice: {found}; each scheme gets one run directory")
    for scheme in found:  # each names a folder: out/<scheme>
        check_name(scheme, "bits scheme")
    return list(found)


def finished(out: Path, resume: bool) -> dict[str, Any] | None:
    """A scheme's results when resuming and it already finished; else None."""
    return (read_results(out) or None) if resume else None


def announce(text: str) -> None:
    """One progress line on stderr, from the primary rank only (under torchrun every rank runs the recipe)."""
    if distributed.is_primary():
        print(text, file=sys.stderr, flush=True)


@contextmanager
def seed_position(index: int, count: int) -> Iterator[None]:
    """Within the block, recipes count their schemes as seed `index` (0-based) of `count`."""
    token = _SEED_POSITION.set((index, count))
    try:
        yield
    finally:
        _SEED_POSITION.reset(token)


def each_scheme(recipe: str, bits: Any, seed: int) -> Iterator[str]:
    """The schemes of `bits` (see `schemes`), each announced as it starts, counted over every
    seed of a sweep: "apprentice w4a4 seed 1 (4/6)"."""
    found = schemes(bits)
    index, count = _SEED_POSITION.get()
    for k, scheme in enumerate(found):
        announce(f"{recipe} {scheme} seed {seed} ({index * len(found) + k + 1}/{count * len(found)})")
        yield scheme
