"""One registry type for everything chosen by name: architectures, criteria (width, depth and expert methods),
training-aware methods, allocations, exporters, corpora, evaluation tasks, encoder criteria.

An entry registers itself from its own module (`@CRITERIA.register("flap")`), or is added as a value
(`TASKS.add("piqa", loader)`). A lazy entry (`EXPORTERS.lazy("gguf", "domainprune.exporters.gguf")`) names the module
that registers it; the module is imported on the first lookup, so listing names costs no import and a heavy
dependency (gguf-py, llama.cpp) loads only when its entry is used. A name registered twice is refused, so two modules
cannot silently shadow each other; an unknown name fails in one line that names the available ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, TypeVar

from .errors import DomainpruneError

T = TypeVar("T")


class Registry(Mapping[str, Any]):
    def __init__(self, kind: str, attribute: str = "name"):
        self.kind = kind  # what an entry is, for messages: "method", "allocation", "architecture"
        self.attribute = attribute  # set on each entry to the name it is registered under
        self._entries: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}  # name -> module that registers it when imported

    def add(self, name: str, entry: T, *, module: str | None = None, **attributes: Any) -> T:
        """Register `entry` under `name`, setting `attributes` (and the name) on it. `module`: the module adding it,
        which may fill a lazy entry declared for that module."""
        if name in self._entries or (name in self._lazy and self._lazy[name] != module):
            where = self._entries.get(name, self._lazy.get(name))
            raise ValueError(f"{self.kind} {name!r} is registered twice ({where!r} and {entry!r})")
        for key, value in {self.attribute: name, **attributes}.items():
            setattr(entry, key, value)
        self._lazy.pop(name, None)
        self._entries[name] = entry
        return entry

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Decorator: register the class or function under `name`, setting `attributes` on it."""

        def wrap(entry: T) -> T:
            return self.add(name, entry, module=entry.__module__, **attributes)

        return wrap

    def lazy(self, name: str, module: str) -> None:
        """Declare `name` without importing `module`; the first lookup imports it, and it registers `name`."""
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({module!r})")
        self._lazy[name] = module

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise DomainpruneError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]

    def pop(self, name: str) -> Any:
        """Remove an entry (a test's own registrations, after the test)."""
        self._lazy.pop(name, None)
        return self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Any:
        if name in self._lazy:
            module = self._lazy[name]
            importlib.import_module(module)
            if name in self._lazy:  # the module was imported but did not register the name: a wiring bug
                raise RuntimeError(f"{self.kind} {name!r}: importing {module} did not register it")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter([*self._entries, *self._lazy])

    def __len__(self) -> int:
        return len(self._entries) + len(self._lazy)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"
