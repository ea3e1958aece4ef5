"""LwF-MC search space: the iCaRL distillation importance, 1–100 log (reference preset 10)."""

from ._primitives import LogUniform

SPACE = {"icarl": LogUniform(1, 100)}
