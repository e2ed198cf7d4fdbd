"""Discovery of plugins through Python entry points, the same way for first and third parties.

Groups: `lightning_sae.selectors` (Selector subclasses) and `lightning_sae.variants`
(LightningModule subclasses). A plugin that fails to import is reported with a warning naming
its entry point; it never takes the CLI down with it.
"""

from __future__ import annotations

import keyword
import warnings
from importlib.metadata import entry_points

from lightning.pytorch import LightningModule

import lightning_sae.registered as registered_namespace
from lightning_sae.selection import Selector

SELECTORS = "lightning_sae.selectors"
VARIANTS = "lightning_sae.variants"

_loaded: dict[str, dict[str, type]] = {}


def _expected_base(group: str) -> type:
    # Variants are checked as LightningModules here, so that discovery (which formats.py uses to
    # find the selector of a SAELens architecture) does not import the training module; the CLI
    # accepts only SAETrainingModule subclasses as models.
    return Selector if group == SELECTORS else LightningModule


def _register_alias(name: str, cls: type) -> type:
    existing = getattr(registered_namespace, name, None)
    if existing is not None and existing.__bases__ == (cls,):
        return existing
    # jsonargparse finds the alias by __module__ + __qualname__ (the entry-point name); __name__ stays
    # the real class's, so messages and reprs (`type(selector).__name__`) name the class, not the alias.
    alias = type(name, (cls,), {"__module__": registered_namespace.__name__, "__qualname__": name, "__doc__": cls.__doc__})
    alias.__name__ = cls.__name__
    setattr(registered_namespace, name, alias)
    return alias


def load_plugins(group: str) -> dict[str, type]:
    """Import every plugin of `group` once; returns {entry-point name: class}."""
    if group in _loaded:
        return _loaded[group]
    base = _expected_base(group)
    found: dict[str, type] = {}
    for entry_point in entry_points(group=group):
        where = f"entry point '{entry_point.name} = {entry_point.value}' (group {group})"
        if not entry_point.name.isidentifier() or keyword.iskeyword(entry_point.name):
            warnings.warn(f"lightning-sae: ignoring {where}: its name must be a Python identifier", stacklevel=2)
            continue
        if entry_point.name in found:
            warnings.warn(f"lightning-sae: ignoring duplicate {where}; '{entry_point.name}' is already registered", stacklevel=2)
            continue
        try:
            cls = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break the CLI
            warnings.warn(f"lightning-sae: could not import plugin {where}: {type(error).__name__}: {error}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, base)):
            warnings.warn(f"lightning-sae: ignoring {where}: it is not a subclass of {base.__qualname__}", stacklevel=2)
            continue
        found[entry_point.name] = cls
        _register_alias(entry_point.name, cls)
    _loaded[group] = found
    return found


def load_all_plugins() -> None:
    load_plugins(SELECTORS)
    load_plugins(VARIANTS)


def create_selector(name: str, **kwargs) -> Selector:
    """Instantiate a registered selector by entry-point name."""
    available = load_plugins(SELECTORS)
    if name not in available:
        names = ", ".join(sorted(available)) or "none installed"
        raise ValueError(f"unknown selector '{name}'; registered selectors: {names}")
    return available[name](**kwargs)
