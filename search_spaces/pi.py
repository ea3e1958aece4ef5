"""PI search space: the regulariser weight, 10–10000 log (SDR preset 1000; MiB used 500/100)."""

from ._primitives import LogUniform

SPACE = {"reg": LogUniform(10, 10000)}
