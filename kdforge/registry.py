"""One generic registry for models, methods and datasets.

Registration happens by decorator at the definition; unknown names raise a ``KeyError`` that lists the closest
valid names, and registering a name twice is an error (a silent overwrite would make a typo in a plugin replace a
built-in without anyone noticing).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def close_matches(name: str, choices: list[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (case-insensitive), best first."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


class UnknownNameError(KeyError):
    """An unknown registry name; ``str()`` is a one-line message naming close matches."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> object mapping with per-entry metadata.

    Args:
        kind: what the registry holds ("model", "method", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``) with metadata ``meta``."""

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``UnknownNameError`` with close matches otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hints = close_matches(name, self.names())
        hint = f"did you mean {', '.join(repr(h) for h in hints)}? " if hints else ""
        return f"unknown {self.kind} '{name}': {hint}run `kdforge {self.kind}s` to list all {len(self._items)}"

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


MODELS: Registry[Callable[..., Any]] = Registry("model")
METHODS: Registry[type] = Registry("method")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
TASKS: Registry[type] = Registry("task")
