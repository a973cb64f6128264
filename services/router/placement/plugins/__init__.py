"""Placement plugins, one module each; every module here is imported (and so registered) on
first registry lookup, so adding a plugin touches one new file and its test."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
