"""Continual methods: one registered module each (FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB, CIL, SDR).

Every public module of this package is imported (:func:`discover`), so adding a method is adding
its module: nothing here lists them. Modules named ``_*`` hold shared code and are not imported.
"""

import importlib
import pkgutil

from .base import (
    STATISTICS,
    Batch,
    Method,
    Output,
    StepContext,
    build_method,
    canonical_method,
    get_method,
    list_methods,
    method_defaults,
    register_method,
    required_statistics,
    weight,
    weight_terms,
)


def discover() -> list[str]:
    """Import every method module of this package's ``__path__`` not imported yet (each registers its
    methods); the names of the modules imported."""
    found = sorted({m.name for m in pkgutil.iter_modules(__path__)} - {"base"})
    names = [name for name in found if not name.startswith("_")]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

__all__ = [
    "STATISTICS", "Batch", "Method", "Output", "StepContext", "build_method", "canonical_method", "discover",
    "get_method", "list_methods", "method_defaults", "register_method", "required_statistics", "weight",
    "weight_terms",
]
