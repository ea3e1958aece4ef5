"""Memory layout per backbone: NCHW vs channels-last (the ``channels_last`` config field).

    python bench/layout.py                 # tiny, resnet18/50/101, mobilenet (CPU: ~3 min)
    python bench/layout.py --quick         # tiny only, a few iterations, no row appended

For each backbone: forward + backward + SGD step of the model on one random batch (plain mean
of the logits as the loss), the two layouts alternated (A B A B) after a warm-up, best of the
two repeats per layout; the ratio is NCHW time / channels-last time (> 1: channels-last faster).
Then the whole smoke step 0 (``run_step``, 100 iterations of voc-15-1) in both layouts, so the
model figure is checked against the engine's loop (loss, loader, evaluation included).
"""

from __future__ import annotations

import time

import _common as C

# backbone, output stride, crop, batch, timed iterations (CPU-sized)
CASES = [("tiny", 8, 64, 16, 20), ("resnet18", 16, 96, 8, 6), ("resnet50", 16, 96, 8, 3),
         ("resnet101", 16, 96, 8, 2), ("mobilenet_v3_large", 16, 96, 8, 6)]


def model_ms(model, x, iters: int) -> float:
    """Milliseconds per forward + backward + SGD step (one warm-up iteration first)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    for i in range(iters + 1):
        if i == 1:
            t0 = time.perf_counter()
        logits, _ = model(x)
        logits.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / iters * 1000


def measure_backbone(backbone: str, os_: int, crop: int, batch: int, iters: int) -> dict:
    import torch

    from csseg_core.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, [16, 1], pretrained=None, output_stride=os_,
                        head_channels=128 if backbone == "tiny" else 256)
    x = torch.randn(batch, 3, crop, crop)
    ms = {"nchw": [], "channels_last": []}
    for _ in range(2):
        for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model.to(memory_format=fmt)
            ms[name].append(model_ms(model, x.contiguous(memory_format=fmt), iters))
    a, b = min(ms["nchw"]), min(ms["channels_last"])
    return {"backbone": backbone, "crop": crop, "batch": batch, "nchw_ms": a, "cl_ms": b, "ratio": a / b}


def measure_step0(iters: int) -> dict:
    from csseg_core.config import resolve_config
    from csseg_core.engine import run_step

    out = {}
    for layout in (False, True, False, True):
        cfg = resolve_config("voc-15-1", "ft", overrides={"iters": iters, "channels_last": layout, "val_fraction": 0.15})
        t0 = time.perf_counter()
        _, m = run_step(cfg, 0)
        wall = time.perf_counter() - t0
        key = "cl" if layout else "nchw"
        out[key] = min(out.get(key, float("inf")), wall)
        out[f"{key}_miou"] = m["miou_all"]
    out["ratio"] = out["nchw"] / out["cl"]
    return out


def main() -> dict:
    p = C.parser(__doc__.splitlines()[0])
    a = p.parse_args()
    import torch

    C.bench_home()
    load0 = C.wait_for_load(a.max_load, enabled=not a.no_wait)
    cases = CASES[:1] if a.quick else CASES
    rows = [measure_backbone(*(c[:4]), 3 if a.quick else c[4]) for c in cases]
    step0 = measure_step0(10 if a.quick else 100)
    load1 = C.loadavg()
    C.print_table(f"memory layout, fwd+bwd+SGD ({torch.get_num_threads()} threads, load {load0:.2f} → {load1:.2f})",
                  ["backbone", "crop", "batch", "NCHW ms", "channels-last ms", "NCHW / channels-last"],
                  [[r["backbone"], r["crop"], r["batch"], C.fmt(r["nchw_ms"], 0), C.fmt(r["cl_ms"], 0), C.fmt(r["ratio"], 2)]
                   for r in rows])
    print(f"smoke step 0 (voc-15-1, FT): NCHW {step0['nchw']:.1f} s, channels-last {step0['cl']:.1f} s "
          f"-> {step0['ratio']:.2f}x (mIoU {step0['nchw_miou']:.3f} vs {step0['cl_miou']:.3f})")
    if not (a.quick or a.no_append):
        figures = {f"{r['backbone']}.ratio": r["ratio"] for r in rows}
        figures.update({"smoke_step0.nchw_s": step0["nchw"], "smoke_step0.cl_s": step0["cl"], "smoke_step0.ratio": step0["ratio"]})
        C.append_row("layout", {"threads": torch.get_num_threads(), "step0_iters": 100, "repeats": 2}, figures,
                     (load0, load1), libs=("torch",))
    return {"rows": rows, "step0": step0}


if __name__ == "__main__":
    main()
