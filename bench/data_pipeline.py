"""Training loader throughput vs the model's consumption rate (is the loader the bottleneck?).

    python bench/data_pipeline.py                      # smoke and small profiles (CPU: ~3-5 min)
    python bench/data_pipeline.py --profiles smoke     # one profile
    python bench/data_pipeline.py --quick              # sanity run, no row appended

For each profile, on step 0 of ``--scenario`` (the largest training view):

* **loader**: iterate the DataLoader the engine builds (``csseg_core.engine.make_loader`` on
  ``build_datasets(...)["train"]``, the profile's batch size, ``num_workers`` and image cache)
  for ``--loader-batches`` batches, after one warm-up batch (worker start-up and the first
  decode are reported apart);
* **model**: forward + backward + SGD step of the profile's model on random tensors of the
  same shape (``batch x 3 x crop x crop``, random labels), plain cross-entropy (FT: the cheapest
  method, so the hardest case for the loader), for ``--model-batches`` batches after a warm-up.

With ``num_workers = 0`` (smoke) loading runs in the training process, so its time adds to
the step: the share of a step spent loading is ``model_rate / (loader_rate + model_rate)``.
With workers it overlaps training, and the loader is a bottleneck when its rate is below the
model's. ``small`` uses ``pretrained=none`` (no download).
"""

from __future__ import annotations

import time

import _common as C


def _settings(profile: str, quick: bool, sets: dict | None = None) -> dict:
    over = {"pretrained": "none", "num_samples": 0}
    if quick:
        over.update(crop_size=48 if profile == "smoke" else 128, batch_size=8)
    return {**over, **(sets or {})}


def measure_profile(profile: str, scenario: str, loader_batches: int, model_batches: int, quick: bool,
                    sets: dict | None = None) -> dict:
    import torch

    from csseg_core.config import resolve_config
    from csseg_core.data import build_datasets, default_data_root
    from csseg_core.engine import make_loader, seed_everything
    from csseg_core.models import build_model
    from csseg_core.scenarios import get_scenario

    cfg = resolve_config(scenario, "ft", profile=profile, overrides=_settings(profile, quick, sets))
    sc = get_scenario(cfg.scenario)
    root = cfg.data_root or str(default_data_root(sc.dataset))
    seed_everything(0)

    t0 = time.perf_counter()
    ds = build_datasets(sc.dataset, root, sc, cfg.mode, 0, crop_size=cfg.crop_size, crop_val=cfg.crop_val,
                        splits=("train",), cache_images=cfg.cache_images)["train"]
    build_s = time.perf_counter() - t0
    loader = make_loader(ds, cfg, train=True, seed=0)

    # ---------------------------------------------------------------- loader alone
    n_img, n_batches, first_s = 0, 0, None
    t0 = time.perf_counter()
    t_start = None
    while n_batches < loader_batches:
        for image, _target in loader:
            if first_s is None:  # worker start-up + first batch
                first_s = time.perf_counter() - t0
                t_start = time.perf_counter()
                continue
            n_img += image.shape[0]
            n_batches += 1
            if n_batches >= loader_batches:
                break
    loader_s = time.perf_counter() - t_start
    loader_rate = n_img / loader_s

    # ---------------------------------------------------------------- model alone
    classes = sc.classes_per_step[:1]
    model = build_model(cfg.backbone, classes, output_stride=cfg.output_stride, pretrained=None,
                        head_channels=cfg.head_channels)
    model.train()
    opt = torch.optim.SGD(model.param_groups(cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          foreach=True)
    b, s = cfg.batch_size, cfg.crop_size
    x = torch.randn(b, 3, s, s)
    y = torch.randint(0, sum(classes), (b, s, s))
    y[:, :2] = 255

    def one():
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        one()
    t0 = time.perf_counter()
    for _ in range(model_batches):
        one()
    model_s = time.perf_counter() - t0
    model_rate = model_batches * b / model_s
    in_process = cfg.num_workers == 0
    load_share = model_rate / (loader_rate + model_rate) if in_process else max(0.0, 1 - loader_rate / model_rate)
    return {
        "profile": profile, "backbone": cfg.backbone, "crop": s, "batch": b, "num_workers": cfg.num_workers,
        "cache_images": cfg.cache_images, "train_images": len(ds), "threads": torch.get_num_threads(),
        "dataset_build_s": build_s, "loader_first_batch_s": first_s, "loader_img_s": loader_rate,
        "model_img_s": model_rate, "loader_over_model": loader_rate / model_rate,
        "load_share_of_step": load_share, "bottleneck": loader_rate < model_rate,
    }


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--profiles", default="smoke,small", help="comma-separated profiles (overrides --profile)")
    p.add_argument("--scenario", default="voc-15-1")
    p.add_argument("--loader-batches", type=int, default=60)
    p.add_argument("--model-batches", type=int, default=None, help="default 30 (smoke) / 6 (small, paper)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as `csseg train`)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="key=value engine override for every profile, e.g. cache_images=false or num_workers=0")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    from csseg_core.config import parse_set

    sets = parse_set(a.sets)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    profiles = [x for x in a.profiles.split(",") if x] if a.profiles else [a.profile]
    C.bench_home()
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    results = []
    for prof in profiles:
        lb = 6 if a.quick else a.loader_batches
        mb = a.model_batches or (30 if prof == "smoke" else 6)
        mb = 2 if a.quick else mb
        print(f"[bench] profile {prof}: {lb} loader batches, {mb} model batches", flush=True)
        results.append(measure_profile(prof, a.scenario, lb, mb, a.quick, sets))
    load1 = C.loadavg()
    cols = ["profile", "backbone", "crop", "batch", "workers", "loader img/s", "model img/s", "loader/model",
            "load share", "first batch s", "bottleneck"]
    C.print_table(f"data pipeline ({a.scenario} step 0, load {load0:.2f} → {load1:.2f})", cols, [
        [r["profile"], r["backbone"], r["crop"], r["batch"], r["num_workers"], r["loader_img_s"], r["model_img_s"],
         r["loader_over_model"], f"{100 * r['load_share_of_step']:.0f}%", r["loader_first_batch_s"],
         "YES" if r["bottleneck"] else "no"] for r in results])
    for r in results:
        verdict = "the LOADER is the bottleneck" if r["bottleneck"] else "the loader is not the bottleneck"
        print(f"{r['profile']}: loader {r['loader_img_s']:.0f} img/s vs model {r['model_img_s']:.0f} img/s -> {verdict}"
              + (f"; loading (in-process, num_workers=0) takes {100 * r['load_share_of_step']:.0f}% of a step"
                 if r["num_workers"] == 0 else ""))
    C.dump_json(a.json, results)
    if not (a.quick or a.no_append):
        figures = {}
        for r in results:
            pr = r["profile"]
            figures.update({f"{pr}.loader_img_s": r["loader_img_s"], f"{pr}.model_img_s": r["model_img_s"],
                            f"{pr}.ratio": r["loader_over_model"], f"{pr}.load_share": r["load_share_of_step"],
                            f"{pr}.bottleneck": r["bottleneck"]})
        settings = {"scenario": a.scenario, "step": 0, "loader_batches": a.loader_batches,
                    **{f"{r['profile']}": f"{r['backbone']} crop {r['crop']} b{r['batch']} w{r['num_workers']} "
                       f"cache={r['cache_images']} threads={r['threads']}" for r in results}}
        C.append_row("data_pipeline", settings, figures, (load0, load1), libs=("torch",))
    return {"results": results, "load": (load0, load1)}


if __name__ == "__main__":
    main()
