"""Continual-learning methods, one module each, registered by name (see ``base.py`` for the hooks)."""

from clbench.methods import piece, seqft  # noqa: F401  (registration side effect)
from clbench.methods.base import Method, TaskContext, build_method, register, registered

__all__ = ["Method", "TaskContext", "build_method", "register", "registered"]
