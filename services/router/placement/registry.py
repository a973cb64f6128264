"""Plugins register by kind and name; profiles build them by name (unknown names are answered
with the list of known ones). Plugin modules are imported lazily on first lookup."""

import importlib
import inspect
from collections.abc import Callable

KINDS = ("filter", "scorer", "picker", "decider")
_PLUGIN_MODULES = ("services.router.placement.plugins",)  # a package: imports all its modules
_registry: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_loaded = False


def register(kind: str, name: str) -> Callable:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; known: {', '.join(KINDS)}")

    def decorate(factory: Callable) -> Callable:
        _registry[kind][name] = factory
        return factory
    return decorate


def build(kind: str, name: str, **params):
    _load_plugins()
    factories = _registry.get(kind)
    if factories is None:
        raise ValueError(f"unknown plugin kind {kind!r}; known: {', '.join(KINDS)}")
    if name not in factories:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(factories))}")
    return factories[name](**params)


def takes(kind: str, name: str, param: str) -> bool:
    """Whether the plugin's factory has a parameter named param (e.g. a picker's seed)."""
    _load_plugins()
    factory = _registry.get(kind, {}).get(name)
    return factory is not None and param in inspect.signature(factory).parameters


def known(kind: str) -> list[str]:
    _load_plugins()
    return sorted(_registry[kind])


def _load_plugins() -> None:
    global _loaded
    if not _loaded:
        for module in _PLUGIN_MODULES:
            importlib.import_module(module)
        _loaded = True
