"""Per-step logging: a rich progress bar and TensorBoard events.

TensorBoard tags (one run directory per continual run or trial):
``step<k>/loss/<term>`` and ``step<k>/lr`` every ``log_every`` iterations; at the end of a
step ``test/miou_all|miou_old|miou_new|miou_avg`` and the same under ``val/`` (the held-out
validation split) (x = step), per-class IoU tables (text) and a few image | ground truth |
prediction samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data.files import voc_colormap
from .metrics import METRICS, format_percent

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class StepLogger:
    """Progress bar + TensorBoard writer for one step; every method is a no-op when disabled."""

    def __init__(self, log_dir, step, scenario, *, progress: bool, total: int, log_every: int = 10) -> None:
        self.step, self.scenario, self.log_every = step, scenario, max(1, log_every)
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        self.progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            desc = f"{scenario.name} step {step}/{scenario.num_steps - 1}"
            self.task = self.progress.add_task(desc, total=total, loss="")
        self._offset = 0

    def iteration(self, it: int, values: dict[str, float], lr: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"loss {sum(values.values()):.3f}")
        if self.writer is not None and it % self.log_every == 0:
            for k, v in values.items():
                self.writer.add_scalar(f"step{self.step}/loss/{k}", v, it)
            self.writer.add_scalar(f"step{self.step}/loss/total", sum(values.values()), it)
            self.writer.add_scalar(f"step{self.step}/lr", lr, it)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step_end(self, metrics: dict, model, test_set, device, num_samples: int) -> None:
        if self.writer is None:
            return
        w, s = self.writer, self.step
        names = self.scenario.class_names()
        for split, prefix in (("val", "val_"), ("test", "")):
            for k in METRICS:
                value = metrics.get(prefix + k, math.nan)
                if not math.isnan(value):
                    w.add_scalar(f"{split}/{k}", value, s)
            rows = ["| class | IoU (%) |", "|---|---|"]
            for name, iou in zip(names, metrics.get(f"{prefix}class_iou", [])):
                rows.append(f"| {name} | {format_percent(iou)} |")
            w.add_text(f"{split}/class_iou", "\n".join(rows), s)
        if num_samples > 0 and len(test_set) > 0:
            w.add_image(f"samples/step{s}", self._samples(model, test_set, device, num_samples), s, dataformats="HWC")
        w.flush()
        w.close()

    @torch.no_grad()
    def _samples(self, model, dataset, device, n: int) -> np.ndarray:
        cmap = voc_colormap()
        rows = []
        model.eval()
        for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int):
            image, target = dataset[int(i)]
            logits, _ = model(image[None].to(device))
            pred = logits.argmax(1)[0].cpu().numpy()
            img = ((image * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            rows.append(np.concatenate([img, cmap[target.numpy().astype(np.uint8)], cmap[pred.astype(np.uint8)]], 1))
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        return np.concatenate(rows, 0)
