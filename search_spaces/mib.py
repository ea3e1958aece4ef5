"""MiB search space: the unbiased-KD weight, 1–100 log (preset 10; 100 in the MiB paper's 15-1)."""

from ._primitives import LogUniform

SPACE = {"kd": LogUniform(1, 100)}
