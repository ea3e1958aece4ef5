"""What did the step-0 model call each new class? The background shift behind a run's new-class IoU.

    python bench/background_shift.py RUN_DIR [RUN_DIR ...]

For each finished run (a ``csseg train`` output folder: its ``config.yaml``, ``steps.parquet`` and
``checkpoints/step*.pt``), the model before each step k > 0 (the step k-1 checkpoint, the teacher
of step k) segments the test images with every class labelled (the ``<dataset>-offline`` view).
Per class added at step k it prints the share of that class's pixels the teacher predicted as
background and as its most frequent old class, the share that the run's unbiased distillation
lets the class take (below), beside the run's final test IoU of the class, and the rank
correlations over every run's new classes.

Why (docs/CALIBRATION.md, section l): on a pixel of a new class, unbiased cross-entropy plus
``kd`` times the unbiased distillation (averaged over the C_old old classes, teacher
probabilities q = softmax(alpha * old logits)) is minimised by p_new = (1 + w q_bg) / (1 + w) and
p_c = w q_c / (1 + w) for the old classes, w = kd / C_old. The new class wins the pixel iff
1 + w q_bg > w max_c q_c: always when w <= 1 (kd <= C_old), and under SDR's kd 100 (w 5-6 on VOC
15-1) only where the teacher's best old class leads its background by less than 1/w.
No row is appended to BENCHMARKS.md: this is an analysis.
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
    """One dict per class of ``run`` added after step 0, as the model before its step saw it."""
    cfg = ExperimentConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    scenario = get_scenario(cfg.scenario)
    params = dict(cfg.method_params)
    kd, alpha = float(params.get("kd", 0.0)), float(params.get("alpha", 1.0))
    offline = get_scenario(f"{scenario.dataset}-offline")
    test = build_datasets(scenario.dataset, cfg.data_root or str(default_data_root(scenario.dataset)), offline,
                          "disjoint", 0, crop_size=cfg.crop_size, crop_val=cfg.crop_val, splits=("test",),
                          val_fraction=cfg.val_fraction)["test"]
    samples = [test[i] for i in range(len(test))]
    final = pq.read_table(run / "steps.parquet").to_pylist()[-1]
    rows = []
    for step in range(1, scenario.num_steps):
        ckpt = sorted((run / "checkpoints").glob(f"step{step - 1}-*.pt"))
        if not ckpt:
            raise SystemExit(f"[bench] {run} has no step-{step - 1} checkpoint (checkpoints/step{step - 1}-*.pt)")
        classes = tuple(scenario.classes_per_step[:step])
        n_old = sum(classes)
        new = range(n_old, n_old + scenario.classes_per_step[step])
        model = build_model(cfg.backbone, classes, pretrained=None, **cfg.model_kwargs())
        load_previous(model, load_state(ckpt[0])["model"])
        model.eval()
        w = kd / n_old  # the unbiased KD is averaged over the old classes
        counts, flippable = np.zeros((len(new), n_old)), np.zeros(len(new))
        with torch.no_grad():
            for image, label in samples:
                label = label.flatten().numpy()
                keep = (label >= new.start) & (label < new.stop)
                if not keep.any():
                    continue
                logits = model(image[None])
                logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                if logits.shape[-2:] != image.shape[-2:]:
                    logits = torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear")
                q = torch.softmax(alpha * logits, 1)[0].flatten(1).numpy()[:, keep]
                c = label[keep] - new.start
                np.add.at(counts, (c, q.argmax(0)), 1)
                np.add.at(flippable, c, (1 + w * q[0] > w * q[1:].max(0)).astype(float))
        for j, cls in enumerate(new):
            row = counts[j] / max(counts[j].sum(), 1)
            top = int(np.argmax(row[1:])) + 1
            rows.append({"run": run.name, "class": cls, "step": step, "bg": float(row[0]), "top_old": top,
                         "top_share": float(row[top]), "flippable": float(flippable[j] / max(counts[j].sum(), 1)),
                         "final_iou": float(final["class_iou"][cls])})
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    rows = [r for run in argv for r in shares(Path(run))]
    C.print_table("What the model before each class's step called it (test pixels), and its final test IoU",
                  ["run", "class (step)", "called bg", "top old class (share)", "learnable", "final IoU"],
                  [[r["run"], f"{r['class']} ({r['step']})", f"{r['bg']:.2f}", f"{r['top_old']} ({r['top_share']:.2f})",
                    f"{r['flippable']:.2f}", f"{r['final_iou']:.3f}"] for r in rows])
    print("called bg: share of the class's pixels the teacher predicted as background; learnable: share where "
          "1 + w q_bg > w max q_old, w = kd / old classes (the class can take the pixel)")
    if len(rows) > 2:
        iou = [r["final_iou"] for r in rows]
        print(f"Spearman rank correlation with the final IoU over {len(rows)} classes: called background "
              f"{spearman([r['bg'] for r in rows], iou):.2f}, learnable {spearman([r['flippable'] for r in rows], iou):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
