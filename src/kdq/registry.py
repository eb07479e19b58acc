"""A small name -> factory registry shared by models, data sets, losses and recipes."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from kdq.errors import KdqError, short_repr, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; `get` fails with the closest names suggested."""

    def __init__(self, kind: str, list_command: str | None = None, hint: str = "") -> None:
        self.kind = kind
        self.list_command = list_command
        self.hint = hint  # appended to the unknown-name error
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            key = name or getattr(item, "__name__").replace("_", "-")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = f"; run `{self.list_command}` to see them all" if self.list_command else ""
            raise KdqError(
                f"unknown {self.kind} {short_repr(name)}{suggest(str(name), self._items)}{hint}{self.hint}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items
