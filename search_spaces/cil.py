"""CIL search space: the CIL distillation weight, 0.1–10 log (intended preset 1)."""

from ._primitives import LogUniform

SPACE = {"cil": LogUniform(0.1, 10)}
