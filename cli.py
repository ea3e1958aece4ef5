"""csseg command line: a thin Typer layer (parse -> frozen config -> call csseg_core / sweeper).

    csseg scenarios                                   # every scenario, its steps and aliases
    csseg methods                                     # every method and its hyperparameters
    csseg data synth --dataset voc --root DIR         # the synthetic dataset in the real layout
    csseg train voc-15-1 --method sdr --profile smoke # all steps of one configuration
    csseg test runs/<run>/checkpoints/step5-<key>.pt  # evaluate a checkpoint
    csseg sweep voc-15-1 --method sdr --trials 8      # Ray Tune + Optuna sweep
    csseg results DIR | csseg export-best DIR --out best.yaml | csseg final best.yaml --seeds 3
    csseg report DIR                                  # report.html + PNGs + report.md of a sweep or a run
    csseg dashboard DIR                               # optuna-dashboard on the sweep's journal (127.0.0.1)

Bad input ends with one line on stderr naming the problem and the fix, and a non-zero exit.
"""

from __future__ import annotations

import sys

from csseg_cli import runs, sweeps  # noqa: F401  (each registers its commands on the app)
from csseg_cli.common import app

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
