"""The one exception type kdq raises for problems a user can fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdqError(Exception):
    """A user-facing error: one line that names the problem and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
