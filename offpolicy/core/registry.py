"""Registries: the names a config chooses from (`engine.name`, `loss.name`, `env.name`, ...).

Reads: nothing. Writes: nothing. A `Registry` is a dict from name to object (a class, a
factory, a loss spec) that knows which config key it serves, so registering is one line and a
wrong name is one `ConfigError` listing the valid ones. The registries: `ENGINES`
(actors/engine.py), `LOSSES` (algorithms/losses.py), `ADVANTAGES` (algorithms/advantages.py),
`ENVS` (envs/__init__.py), `SAMPLERS` and `PRIORITIES` (buffer/samplers.py), `WEIGHT_SYNCS`
(weights/sync.py).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from offpolicy.core.errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> T for the config key `key`."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def register(self, name: str, obj: T | None = None):
        """`register(name, obj)` adds `obj`; `@register(name)` adds the decorated object."""
        if obj is not None:
            self[name] = obj
            return obj

        def wrap(o: T) -> T:
            self[name] = o
            return o
        return wrap

    def lookup(self, name: str) -> T:
        """The object registered as `name`; a ConfigError naming the key and the valid names
        otherwise."""
        if name not in self:
            raise ConfigError(f"{self.key}: unknown '{name}'; valid: {', '.join(sorted(self))}")
        return self[name]

