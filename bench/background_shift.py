"""What did the step-0 model call each new class? The background shift behind a run's new-class IoU.

    python bench/background_shift.py RUN_DIR [RUN_DIR ...]

For each finished run (a ``csseg train`` output folder: its ``config.yaml``, ``steps.parquet`` and
``checkpoints/step0-*.pt``), the step-0 model segments the test images with every class labelled
(the ``<dataset>-offline`` view). Per class added after step 0 it prints the share of that class's
pixels the step-0 model predicted as background and as its most frequent old class, beside the
run's final test IoU of the class, and the rank correlation of the two over every run's new classes.

Why (docs/CALIBRATION.md, section l): the unbiased distillation of MiB and SDR pulls the new model
towards the old one's answer on every pixel, merging background with the new classes; a new class
the old model calls background is free to be learnt, one it calls an old class is held there in
proportion to the distillation weight. No row is appended to BENCHMARKS.md: this is an analysis.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from csseg_core.config import ExperimentConfig
from csseg_core.data import build_datasets, default_data_root
from csseg_core.models import build_model, load_previous
from csseg_core.scenarios import get_scenario
from csseg_core.state import load_state


def shares(run: Path) -> list[dict]:
    """One dict per new class of ``run``: bg share, top old class and its share, final IoU."""
    cfg = ExperimentConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    scenario = get_scenario(cfg.scenario)
    ckpt = sorted((run / "checkpoints").glob("step0-*.pt"))
    if not ckpt:
        raise SystemExit(f"[bench] {run} has no step-0 checkpoint (checkpoints/step0-*.pt)")
    n_old = scenario.classes_per_step[0]
    model = build_model(cfg.backbone, (n_old,), pretrained=None, **cfg.model_kwargs())
    load_previous(model, load_state(ckpt[0])["model"])
    model.eval()
    offline = get_scenario(f"{scenario.dataset}-offline")
    test = build_datasets(scenario.dataset, cfg.data_root or str(default_data_root(scenario.dataset)), offline,
                          "disjoint", 0, crop_size=cfg.crop_size, crop_val=cfg.crop_val, splits=("test",),
                          val_fraction=cfg.val_fraction)["test"]
    n_all = sum(scenario.classes_per_step)
    counts = np.zeros((n_all, n_old))
    with torch.no_grad():
        for i in range(len(test)):
            image, label = test[i]
            logits = model(image[None])
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            if logits.shape[-2:] != label.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear")
            pred, label = logits.argmax(1)[0].flatten().numpy(), label.flatten().numpy()
            keep = label < n_all
            np.add.at(counts, (label[keep], pred[keep]), 1)
    final = pq.read_table(run / "steps.parquet").to_pylist()[-1]
    rows = []
    for c in range(n_old, n_all):
        row = counts[c] / max(counts[c].sum(), 1)
        top = int(np.argmax(row[1:])) + 1
        rows.append({"run": run.name, "class": c, "bg": float(row[0]), "top_old": top, "top_share": float(row[top]),
                     "final_iou": float(final["class_iou"][c])})
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    rows = [r for run in argv for r in shares(Path(run))]
    C.print_table("What the step-0 model called each new class (test pixels), and the class's final test IoU",
                  ["run", "class", "called background", "most frequent old class (share)", "final IoU"],
                  [[r["run"], str(r["class"]), f"{r['bg']:.2f}", f"{r['top_old']} ({r['top_share']:.2f})",
                    f"{r['final_iou']:.3f}"] for r in rows])
    if len(rows) > 2:
        print(f"Spearman rank correlation (called background, final IoU) over {len(rows)} classes: "
              f"{spearman([r['bg'] for r in rows], [r['final_iou'] for r in rows]):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
