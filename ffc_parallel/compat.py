"""Names that moved in the 0.2 re-layout (docs/architecture.md lists them), importable from their old
places for one more release: each use warns once with the new path."""
from __future__ import annotations

import importlib
import warnings


def moved_names(old_module: str, new_homes: dict[str, str]):
    """A module ``__getattr__`` for ``old_module`` that serves ``name`` from ``new_homes[name]`` (a module
    path, or ``"module:new_name"`` for a renamed object) with a ``DeprecationWarning``."""

    def __getattr__(name: str):
        if name not in new_homes:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, new_name = new_homes[name].partition(":")
        new_name = new_name or name
        warnings.warn(f"{old_module}.{name} is now {module}.{new_name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new_name)

    return __getattr__
