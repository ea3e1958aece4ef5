"""SDR search space: the ranges published with the SDR code (README "hyper-parameter ranges").

KD 1–100 (same range as MiB), prototype matching 1e-3–1e-1, attraction and repulsion
1e-3–1e-2, sparsity 1e-5–1e-3, all log-uniform; the sparsity variants as categorical
choices (``max_minus_ratio`` is left out: the reference never implemented it).
"""

from ._primitives import Choice, LogUniform

SPACE = {
    "kd": LogUniform(1, 100),
    "pm": LogUniform(1e-3, 1e-1),
    "attraction": LogUniform(1e-3, 1e-2),
    "repulsion": LogUniform(1e-3, 1e-2),
    "sparsity": LogUniform(1e-5, 1e-3),
    "sparsity_norm": Choice(("max_maskedforclass", "max_foreachfeature", "max_overall", "L1", "L2", "softmax")),
    "sparsity_shrink": Choice(("exponential", "squared", "power3")),
    "sparsity_kind": Choice(("ratio", "entropy", "lasso")),
}
