"""Sweep throughput at the README demo's settings: 1 vs 2 concurrent trials, FIFO vs ASHA.

    python bench/sweep_throughput.py                  # 4 trials of voc-15-1 SDR smoke, 4 sweeps (~45 min quiet)
    python bench/sweep_throughput.py --set iters=100 --set iters_incremental=20   # shorter steps (~15 min)
    python bench/sweep_throughput.py --quick          # sanity run, no row appended

The README's main job is ``csseg sweep voc-15-1 --method sdr --trials 4`` (smoke profile, SDR's
search space, the preset first, seeded TPE). This script runs that sweep four times through
``sweeper.run_sweep`` in one Ray session started as ``csseg sweep`` does: ``--variants``
(default ``fifo:1,fifo:2,asha:1,asha:2``) = scheduler and concurrent trials. Every sweep
trains its own step 0 once (shared by its trials, as the README run does); ``--seed-step0``
trains it once beforehand and seeds every sweep's cache instead (then only incremental steps
are timed). The sampler is seeded and its first 10 trials are random, so the four sweeps
evaluate the same configurations; ASHA (grace period 1, reduction factor 2, on the step) stops
some of them early.

Figures per sweep: wall time of ``run_sweep``; **trial-steps per minute** = finished
(trial, step) rows of ``steps.parquet`` (a step 0 served from the cache counts: the trial has
it) per minute of wall time; trained steps per minute (cache hits excluded); trials per minute
(evaluated configurations, whatever ASHA did to them); statuses. Ratios are measured in one run:
``c2/c1`` under FIFO and ASHA, ``asha/fifo`` at each concurrency, and ``asha:2 / fifo:1``
(both levers). ASHA lowers the steps a sweep runs, so its gain shows in wall time and trials
per minute more than in trial-steps per minute (a stopped trial pays the fixed trial cost for
fewer steps).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import _common as C


def run_one(scheduler: str, conc: int, a, overrides: dict, storage: Path, state_file: Path | None, cfg) -> dict:
    from sweeper import SweepSpec, run_sweep
    from sweeper.tables import STEPS, TRIALS, read_table

    name = f"bench-{scheduler}-c{conc}"
    if state_file is not None:
        C.seed_step0(storage / name, cfg, state_file)
    spec = SweepSpec(scenarios=(a.scenario,), method=a.method, trials=a.trials, concurrency=conc, scheduler=scheduler,
                     storage=str(storage), name=name, overrides=overrides, max_failures=0, verbose=0, seed=a.seed,
                     profile=a.profile)
    meter = C.TreeCpu().start()
    t0 = time.perf_counter()
    sweep_dir = run_sweep(spec)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    steps = [r for r in read_table(sweep_dir, STEPS) if r.get("status") == "ok"]
    trials = read_table(sweep_dir, TRIALS)
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    trained = [r for r in steps if not r.get("cached")]
    minutes = wall / 60.0
    return {"scheduler": scheduler, "concurrency": conc, "wall_s": wall, "trial_steps": len(steps),
            "trained_steps": len(trained), "trial_steps_per_min": len(steps) / minutes,
            "trained_steps_per_min": len(trained) / minutes, "trials": len(trials), "trials_per_min": len(trials) / minutes,
            "statuses": statuses, "tree_cpu_util": cpu["tree_cpu_util"], "machine_cpu_util": cpu["machine_cpu_util"]}


def _ratio(runs: dict, num: str, den: str, key: str) -> float:
    if num in runs and den in runs and runs[den][key]:
        return runs[num][key] / runs[den][key]
    return float("nan")


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    C.add_run_args(p, trials=4)
    p.set_defaults(scenario="voc-15-1")
    p.add_argument("--variants", default="fifo:1,fifo:2,asha:1,asha:2", help="scheduler:concurrency, in run order")
    p.add_argument("--seed", type=int, default=0, help="sweep seed (runs and TPE sampler), as `csseg sweep --seed`")
    p.add_argument("--seed-step0", action="store_true", help="train step 0 once outside and seed every sweep's cache")
    a = p.parse_args(argv)
    cfg, overrides = C.bench_config(a, {}, quick={"iters": 40, "iters_incremental": 8, "crop_size": 48,
                                                  "head_channels": 32, "num_samples": 0})
    cfg = dataclasses.replace(cfg, seed=a.seed)  # the sweep's seed: its step-0 key (--seed-step0)
    variants = []
    for v in a.variants.split(","):
        scheduler, _, conc = v.strip().partition(":")
        if scheduler not in ("fifo", "asha") or not conc.isdigit() or int(conc) < 1:
            p.error(f"bad variant {v!r}: expected fifo:N or asha:N")
        variants.append((scheduler, int(conc)))
    C.warm_data(cfg, range(cfg.num_steps))
    state_file = C.fixed_step0(cfg)[1] if a.seed_step0 else None
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    import ray

    res: dict = {"ray_init_s": C.start_ray(a.dashboard, a.scenario), "runs": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="csseg-bench-sweep-") as tmp:
            for scheduler, conc in variants:
                print(f"[bench] {scheduler}, {conc} concurrent: {a.trials} trials of {a.scenario} ...", flush=True)
                res["runs"][f"{scheduler}:{conc}"] = run_one(scheduler, conc, a, overrides, Path(tmp), state_file, cfg)
    finally:
        ray.shutdown()
    load1 = C.loadavg()

    runs = res["runs"]
    ratios = {}
    for key in ("trial_steps_per_min", "trials_per_min"):
        short = "steps" if key.startswith("trial_steps") else "trials"
        for s in ("fifo", "asha"):
            ratios[f"{s}.c2/c1.{short}"] = _ratio(runs, f"{s}:2", f"{s}:1", key)
        for c in (1, 2):
            ratios[f"c{c}.asha/fifo.{short}"] = _ratio(runs, f"asha:{c}", f"fifo:{c}", key)
        ratios[f"asha2/fifo1.{short}"] = _ratio(runs, "asha:2", "fifo:1", key)
    res["ratios"] = ratios
    C.print_table(f"sweep throughput: {a.trials} trials of {a.scenario} ({a.method}, {a.profile}) "
                  f"(load {load0:.2f} → {load1:.2f})",
                  ["variant", "wall s", "trial-steps", "trial-steps/min", "trained steps/min", "trials/min", "statuses",
                   "tree CPU", "machine CPU"],
                  [[k, r["wall_s"], r["trial_steps"], r["trial_steps_per_min"], r["trained_steps_per_min"],
                    r["trials_per_min"], ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items())),
                    f"{100 * r['tree_cpu_util']:.0f}%", f"{100 * r['machine_cpu_util']:.0f}%"] for k, r in runs.items()])
    for k, v in ratios.items():
        print(f"ratio {k} = {C.fmt(v)}")
    C.dump_json(a.json, res)
    short = [k for k, r in runs.items() if r["trials"] < a.trials]
    if short:  # an interrupted or stuck sweep: its figures mean nothing
        print(f"[bench] no row appended: {', '.join(short)} recorded fewer than {a.trials} trials")
    elif not (a.quick or a.no_append):
        figures = dict(ratios)
        for k, r in runs.items():
            figures.update({f"{k}.wall_s": r["wall_s"], f"{k}.trial_steps": r["trial_steps"],
                            f"{k}.trial_steps_per_min": r["trial_steps_per_min"],
                            f"{k}.trials_per_min": r["trials_per_min"],
                            f"{k}.status": " ".join(f"{n}{s}" for s, n in sorted(r["statuses"].items())),
                            f"{k}.machine_cpu": r["machine_cpu_util"]})
        settings = {"scenario": a.scenario, "method": a.method, "trials": a.trials, "profile": a.profile, "seed": a.seed,
                    **overrides, "variants": a.variants,
                    "step0": "seeded (trained once outside)" if a.seed_step0 else "trained once per sweep",
                    "dashboard": a.dashboard}
        C.append_row("sweep_throughput", settings, figures, (load0, load1))
    return res


if __name__ == "__main__":
    main()
