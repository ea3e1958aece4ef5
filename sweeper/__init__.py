"""Ray Tune + Optuna + Ray Train orchestration of csseg sweeps.

Public API (what ``cli.py`` calls)::

    from sweeper import SweepSpec, run_sweep, leaderboard, export_best, load_best, best_config, run_final
    sweep_dir = run_sweep(SweepSpec(scenarios=("voc-15-1",), method="sdr", trials=50))
    rows = leaderboard(sweep_dir, "all")               # csseg results DIR (ranked on validation)
    export_best(sweep_dir, "all", "best.yaml")         # csseg export-best DIR --out best.yaml
    export_best(sweep_dir, "all", "best.yaml", top=3, seeds=3)   # noise-aware: best mean over seeds
    summary = run_final("best.yaml", seeds=3)          # csseg final best.yaml --seeds 3

Only this package imports Ray; ``csseg_core`` stays torch-only.
"""

from .export import best_config, best_entries, export_best, leaderboard, load_best, pareto_front, run_final, unranked_note
from .reeval import read_reeval, reevaluate
from .spec import METRICS, PROTOCOLS, SCHEDULERS, Plan, SweepSpec, metric_name, plan_sweep


def __getattr__(name: str):
    # Ray is imported only when a sweep runs: reading results stays fast.
    if name in ("run_sweep", "size_concurrency"):
        from . import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")

__all__ = [
    "METRICS", "PROTOCOLS", "SCHEDULERS", "read_reeval", "reevaluate", "Plan", "SweepSpec", "best_config", "best_entries", "export_best", "leaderboard",
    "load_best", "metric_name", "pareto_front", "plan_sweep", "run_final", "run_sweep", "size_concurrency", "unranked_note",
]
