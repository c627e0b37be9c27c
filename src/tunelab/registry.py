"""One registry type behind every concept users extend: methods, stages, record and preference formats, chat
templates, metrics and inference engines (each module keeps its own register_x/get_x functions over one instance).

Entries are kept by name, in registration order; a duplicate is refused and an unknown name names the known ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from tunelab.errors import TunelabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (`what`, e.g. "method", used in every message).

    `unknown`: the exception `get` raises for a name it does not hold (TunelabError, or KeyError where the caller
    turns it into a message of its own). `sort`: names() (and so the messages) in alphabetical rather than
    registration order. `reserved`: names no entry may take (e.g. a format's "auto").
    """

    def __init__(self, what: str, *, unknown: type[Exception] = TunelabError, sort: bool = False,
                 reserved: Iterable[str] = ()):
        self.what = what
        self._unknown = unknown
        self._sort = sort
        self._reserved = frozenset(reserved)
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, entry: T, name: str | None = None) -> T:
        """Add `entry` under `name` (default: `entry.name`); a name already taken is a ValueError."""
        name = name if name is not None else entry.name  # type: ignore[attr-defined]
        if name in self._entries or name in self._aliases or name in self._reserved:
            raise ValueError(f"{self.what} {name!r} is already registered; known: {', '.join(self.names())}")
        self._entries[name] = entry
        return entry

    def alias(self, alias: str, name: str) -> None:
        """Let `get(alias)` return the entry `name` (e.g. the template "qwen2.5" for "qwen")."""
        if alias in self._entries or alias in self._reserved:
            raise ValueError(f"{self.what} {alias!r} is already registered; it cannot be an alias")
        self.get(name)
        self._aliases[alias] = name

    def unregister(self, name: str) -> T:
        """Remove an entry (tests, plugins reloading) and return it."""
        self.get(name)
        return self._entries.pop(self._aliases.get(name, name))

    def get(self, name: str) -> T:
        entry = self._entries.get(self._aliases.get(name, name))
        if entry is None:
            raise self._unknown(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries) if self._sort else list(self._entries)

    def entries(self) -> list[T]:
        """Every entry, in the order of names()."""
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[T]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)
