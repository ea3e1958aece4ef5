"""An N-trial sweep with the shared step-0 cache vs every trial training its own step 0.

    python bench/step0_sharing.py                   # N=3, voc-15-5 SDR smoke (~8-10 min on 2 cores)
    python bench/step0_sharing.py --trials 4 --set epochs=3
    python bench/step0_sharing.py --quick           # sanity run, no row appended

``SweepSpec`` has no switch to turn sharing off, so the benchmark gives each trial its own
step-0 key instead: both sweeps search the same custom space and evaluate the same N points
(``kd`` values); the *separate* sweep also sets the step-0 learning rate ``lr`` to N values
that differ by 1e-12 relative (the same training, but a distinct ``cfg.step_key(0)`` per
trial), so its cache trains step 0 once per trial. Everything else (Ray session started as
``csseg sweep`` does, dashboard included, concurrency, data, caches) is identical.

Reported: both wall times, their ratio and the target ``1/N + incremental share``, where the
incremental share is the part of a trial that is not step 0 in the separate sweep
(``1 - mean step-0 wall / mean trial wall``, overheads counted as incremental). The ratio a
perfect cache would give is ``(s0 + N·r) / (N·(s0 + r))`` with ``s0`` the step-0 time and
``r`` the rest of a trial.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common as C


def _space(n: int, separate: bool, lr: float):
    from search_spaces import Choice

    kds = [round(10.0 * (i + 1), 6) for i in range(n)]
    lrs = [lr * (1.0 + 1e-12 * i) for i in range(n)]
    space = {"kd": Choice(kds)}
    points = [{"kd": k} for k in kds]
    if separate:
        space["lr"] = Choice(lrs)
        points = [{"kd": k, "lr": x} for k, x in zip(kds, lrs)]
    return space, points


def run_one(kind: str, a, overrides: dict, storage: Path) -> dict:
    from sweeper import SweepSpec, run_sweep

    base_lr = overrides.get("lr", 0.05)
    space, points = _space(a.trials, kind == "separate", float(base_lr))
    spec = SweepSpec(scenarios=(a.scenario,), method=a.method, trials=a.trials, concurrency=a.concurrency,
                     storage=str(storage), name=f"bench-step0-{kind}", overrides=overrides, space=space,
                     points=points, max_failures=0, verbose=0, seed=42, profile=a.profile)
    meter = C.TreeCpu().start()
    t0 = time.perf_counter()
    sweep_dir = run_sweep(spec)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    fig = C.sweep_figures(sweep_dir)
    fig.update(wall_s=wall, **cpu)
    return fig


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    C.add_run_args(p, trials=3)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--order", default="separate,shared", help="which sweep runs first")
    a = p.parse_args(argv)
    cfg, overrides = C.bench_config(a, {"epochs": 3, "epochs_incremental": 2, "num_samples": 0},
                                    quick={"epochs": 1, "epochs_incremental": 1, "crop_size": 48, "head_channels": 32})
    C.warm_data(cfg, range(cfg.num_steps))
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    import ray

    ray_init_s = C.start_ray(a.dashboard, a.scenario)
    res: dict = {"ray_init_s": ray_init_s}
    try:
        with tempfile.TemporaryDirectory(prefix="csseg-bench-step0-") as tmp:
            for kind in a.order.split(","):
                print(f"[bench] {kind} step 0: {a.trials} trials of {a.scenario} ...", flush=True)
                res[kind] = run_one(kind, a, overrides, Path(tmp) / kind)
    finally:
        ray.shutdown()
    load1 = C.loadavg()

    sh, sep = res["shared"], res["separate"]
    n = a.trials
    ratio = sh["wall_s"] / sep["wall_s"]
    s0 = statistics.mean(sep["step0_wall_s"]) if sep["step0_wall_s"] else float("nan")
    trial = statistics.mean(sep["trial_wall_s"]) if sep["trial_wall_s"] else float("nan")
    inc_share = 1.0 - s0 / trial
    target = 1.0 / n + inc_share
    rest = trial - s0
    ideal = (s0 + n * rest) / (n * (s0 + rest))
    res["summary"] = {"ratio": ratio, "target": target, "inc_share": inc_share, "ideal_ratio": ideal,
                      "met": ratio <= target}
    C.print_table(f"step-0 sharing: {n} trials of {a.scenario} ({a.method}, {a.profile}), concurrency {a.concurrency} "
                  f"(load {load0:.2f} → {load1:.2f})",
                  ["sweep", "wall s", "step-0 trainings", "mean step-0 s", "mean trial s", "incremental steps",
                   "tree CPU util"],
                  [[k, r["wall_s"], r["step0_trained"],
                    statistics.mean(r["step0_wall_s"]) if r["step0_wall_s"] else float("nan"),
                    statistics.mean(r["trial_wall_s"]) if r["trial_wall_s"] else float("nan"),
                    r["incremental_steps"], f"{100 * r['tree_cpu_util']:.0f}%"] for k, r in (("shared", sh), ("separate", sep))])
    print(f"wall ratio shared/separate = {ratio:.3f}; target <= 1/N + incremental share = 1/{n} + {inc_share:.3f} = "
          f"{target:.3f} -> {'met' if ratio <= target else 'MISSED'}; a perfect cache would give {ideal:.3f}")
    C.dump_json(a.json, res)
    if not (a.quick or a.no_append):
        figures = {"shared_wall_s": sh["wall_s"], "separate_wall_s": sep["wall_s"], "ratio": ratio,
                   "target": target, "inc_share": inc_share, "ideal_ratio": ideal,
                   "step0_trainings_shared": sh["step0_trained"], "step0_trainings_separate": sep["step0_trained"],
                   "mean_step0_s": s0, "mean_trial_s_separate": trial,
                   "mean_trial_s_shared": statistics.mean(sh["trial_wall_s"]) if sh["trial_wall_s"] else float("nan"),
                   "met": ratio <= target}
        settings = {"scenario": a.scenario, "method": a.method, "N": n, "concurrency": a.concurrency,
                    "profile": a.profile, **{k: v for k, v in overrides.items() if k != "num_samples"},
                    "order": a.order, "dashboard": a.dashboard,
                    "no-sharing via": "distinct step-0 lr per trial (1e-12 rel.)"}
        C.append_row("step0_sharing", settings, figures, (load0, load1))
    return res


if __name__ == "__main__":
    main()
