"""Continual methods: one registered module each (FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB, CIL, SDR).

Every public module of this package is imported (:func:`discover`), so adding a method is adding
its module: nothing here lists them. Modules named ``_*`` hold shared code and are not imported.
"""

import importlib
import pkgutil

from ..collectors import register_statistic, statistic_names
from .base import (
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
    importlib.invalidate_caches()  # finders may hold a listing older than a module just added
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

STATISTICS = statistic_names()
"""Statistics a step can collect (those the discovered methods registered). A step collects those
its consumers need: the methods that will continue from its state (:func:`required_statistics`);
``state["collected"]`` records them."""

__all__ = [
    "STATISTICS", "Batch", "Method", "Output", "StepContext", "build_method", "canonical_method", "discover",
    "get_method", "list_methods", "method_defaults", "register_method", "register_statistic", "required_statistics",
    "statistic_names", "weight", "weight_terms",
]
