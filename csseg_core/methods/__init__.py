"""Continual methods: one registered module each (FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB, CIL, SDR)."""

from . import ft, lwf, lwf_mc, ilt, regularizers, mib, cil, sdr  # noqa: F401  # isort: skip  (registration order = listing order)
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
)

__all__ = [
    "STATISTICS", "Batch", "Method", "Output", "StepContext", "build_method", "canonical_method",
    "get_method", "list_methods", "method_defaults", "register_method", "required_statistics",
]
