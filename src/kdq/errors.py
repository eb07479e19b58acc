"""The one exception type kdq raises for problems a user can fix."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


class KdqError(Exception):
    """A user-facing error: one line that names the problem and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def short_repr(value: object, limit: int = 60) -> str:
    """A repr of `value` at most `limit` characters long, for error messages.

    Built with reprlib, so a huge or deeply shared value (a YAML alias bomb) is never
    expanded in full: only its first few items at the first few levels are visited.
    """
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
