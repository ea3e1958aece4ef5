"""LwF search space: the KD weight, 1–100 log (reference preset 100)."""

from ._primitives import LogUniform

SPACE = {"kd": LogUniform(1, 100)}
