"""One registry type for everything chosen by name: architectures, criteria, allocations, encoder criteria.

An entry registers itself from its own module (`@CRITERIA.register("flap")`); a name registered twice is refused, so
two modules cannot silently shadow each other; an unknown name fails in one line that names the available ones.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .errors import DomainpruneError

T = TypeVar("T")


class Registry(dict[str, Any]):
    def __init__(self, kind: str, attribute: str = "name"):
        super().__init__()
        self.kind = kind  # what an entry is, for messages: "method", "allocation", "architecture"
        self.attribute = attribute  # set on each entry to the name it is registered under

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Decorator: register the class or function under `name`, setting `attributes` on it."""

        def wrap(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name]!r} and {entry!r})")
            for key, value in {self.attribute: name, **attributes}.items():
                setattr(entry, key, value)
            self[name] = entry
            return entry

        return wrap

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise DomainpruneError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]
