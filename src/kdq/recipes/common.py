"""What every recipe shares: the registry, schemes, and finished-scheme reuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdq.errors import KdqError
from kdq.registry import Registry
from kdq.rundir.layout import check_name, read_results

RECIPES = Registry("recipe")
# A recipe's own checks of its options, beyond what every recipe checks (kdq.recipes.check_recipe).
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


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
