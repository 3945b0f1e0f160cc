"""Continual-learning methods, one module each, registered by name (see ``base.py`` for the hooks).

Every module of this package is imported here, so a new method only needs its own file and config.
"""

import importlib
import pkgutil

from clbench.methods.base import Method, TaskContext, build_method, register, registered

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "TaskContext", "build_method", "register", "registered"]
