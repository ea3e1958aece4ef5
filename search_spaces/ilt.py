"""ILT search space: output KD 1–100 and feature distillation 1–1000, both log (presets 100, 100)."""

from ._primitives import LogUniform

SPACE = {"kd": LogUniform(1, 100), "de": LogUniform(1, 1000)}
