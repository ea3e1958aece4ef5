"""Sweep throughput with 1 vs 2 concurrent trials on the machine's cores (target ≥ 1.8×).

    python bench/concurrency.py                       # 4 trials of voc-15-5 SDR smoke, c=1 then c=2 (~8 min)
    python bench/concurrency.py --trials 6 --set epochs_incremental=3
    python bench/concurrency.py --quick               # sanity run, no row appended

The same sweep (same custom space, the same ``--trials`` explicit ``kd`` points, so every
trial does the same work) runs through ``sweeper.run_sweep`` at ``concurrency=1`` and then at
``concurrency=2`` (order with ``--order``), in one Ray session started as ``csseg sweep`` does.
Each trial is one ``TorchTrainer`` with one 1-CPU worker (Ray gives it one torch thread).
Step 0 is trained once before the measurement and seeded into both sweeps' step-0 caches, so
the figure is about the trials' incremental steps (``--train-step0`` trains it inside each sweep
instead, which adds a serial phase).

Throughput = trained steps (rows of ``steps.parquet`` that were not served from the step-0
cache) per minute of ``run_sweep`` wall time. CPU utilisation: this process tree (Ray's
raylet, GCS, dashboard and workers; psutil, sampled every 0.5 s) over wall × cores, and the
whole machine from ``/proc/stat`` (other users included).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common as C


def run_one(conc: int, a, overrides: dict, storage: Path, state_file: Path | None, cfg) -> dict:
    from search_spaces import Choice
    from sweeper import SweepSpec, run_sweep

    kds = [round(5.0 * (i + 1), 6) for i in range(a.trials)]
    name = f"bench-conc{conc}"
    if state_file is not None:
        C.seed_step0(storage / name, cfg, state_file)
    spec = SweepSpec(scenarios=(a.scenario,), method=a.method, trials=a.trials, concurrency=conc,
                     storage=str(storage), name=name, overrides=overrides, space={"kd": Choice(kds)},
                     points=[{"kd": k} for k in kds], max_failures=0, verbose=0, seed=cfg.seed, profile=a.profile)
    meter = C.TreeCpu().start()
    t0 = time.perf_counter()
    sweep_dir = run_sweep(spec)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    fig = C.sweep_figures(sweep_dir)
    fig.update(wall_s=wall, concurrency=conc, steps_per_min=fig["trained_steps"] / (wall / 60.0), **cpu)
    return fig


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    C.add_run_args(p, trials=4)
    p.add_argument("--order", default="1,2", help="concurrency levels, in the order they run")
    p.add_argument("--train-step0", action="store_true", help="train step 0 inside each sweep (not seeded)")
    a = p.parse_args(argv)
    cfg, overrides = C.bench_config(a, {"epochs": 1, "epochs_incremental": 3, "num_samples": 0},
                                    quick={"epochs_incremental": 1, "crop_size": 48, "head_channels": 32})
    C.warm_data(cfg, range(cfg.num_steps))
    state_file = None if a.train_step0 else C.fixed_step0(cfg)[1]
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    import ray

    ray_init_s = C.start_ray(a.dashboard, a.scenario)
    res: dict = {"ray_init_s": ray_init_s, "runs": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="csseg-bench-conc-") as tmp:
            for conc in (int(x) for x in a.order.split(",")):
                print(f"[bench] concurrency {conc}: {a.trials} trials of {a.scenario} ...", flush=True)
                res["runs"][conc] = run_one(conc, a, overrides, Path(tmp), state_file, cfg)
    finally:
        ray.shutdown()
    load1 = C.loadavg()

    runs = res["runs"]
    r1, r2 = runs.get(1), runs.get(2)
    ratio = r2["steps_per_min"] / r1["steps_per_min"] if r1 and r2 else float("nan")
    res["summary"] = {"ratio": ratio, "met": ratio >= 1.8}
    C.print_table(f"sweep throughput: {a.trials} trials of {a.scenario} ({a.method}, {a.profile}) "
                  f"(load {load0:.2f} → {load1:.2f})",
                  ["concurrency", "wall s", "trained steps", "steps/min", "mean step s", "mean trial s", "train img/s",
                   "tree CPU", "machine CPU"],
                  [[c, r["wall_s"], r["trained_steps"], r["steps_per_min"],
                    statistics.mean(r["inc_wall_s"]) if r["inc_wall_s"] else float("nan"),
                    statistics.mean(r["trial_wall_s"]) if r["trial_wall_s"] else float("nan"),
                    statistics.mean(r["images_per_s"]) if r["images_per_s"] else float("nan"),
                    f"{100 * r['tree_cpu_util']:.0f}%", f"{100 * r['machine_cpu_util']:.0f}%"] for c, r in runs.items()])
    print(f"throughput ratio c=2 / c=1 = {ratio:.2f} (target >= 1.8) -> {'met' if ratio >= 1.8 else 'MISSED'}")
    C.dump_json(a.json, res)
    if not (a.quick or a.no_append):
        figures = {"ratio": ratio, "met": ratio >= 1.8}
        for c, r in runs.items():
            figures.update({f"c{c}.wall_s": r["wall_s"], f"c{c}.steps_per_min": r["steps_per_min"],
                            f"c{c}.mean_step_s": statistics.mean(r["inc_wall_s"]) if r["inc_wall_s"] else float("nan"),
                            f"c{c}.mean_trial_s": statistics.mean(r["trial_wall_s"]) if r["trial_wall_s"] else float("nan"),
                            f"c{c}.img_s": statistics.mean(r["images_per_s"]) if r["images_per_s"] else float("nan"),
                            f"c{c}.tree_cpu": r["tree_cpu_util"], f"c{c}.machine_cpu": r["machine_cpu_util"]})
        settings = {"scenario": a.scenario, "method": a.method, "trials": a.trials, "profile": a.profile,
                    **{k: v for k, v in overrides.items() if k != "num_samples"}, "order": a.order,
                    "step0": "trained in sweep" if a.train_step0 else "seeded (trained once outside)",
                    "dashboard": a.dashboard}
        C.append_row("concurrency", settings, figures, (load0, load1))
    return res


if __name__ == "__main__":
    main()
