"""The same continual step run bare vs inside a Ray Train trial: fixed overhead and throughput.

    python bench/trial_overhead.py                                    # voc-15-5 step 1, ~5-8 min on 2 cores
    python bench/trial_overhead.py --set epochs_incremental=8         # a longer step
    python bench/trial_overhead.py --no-sweep                         # skip the run_sweep measurement
    python bench/trial_overhead.py --quick                            # sanity run, no row appended

A fixed step-0 state (trained once, kept in the bench cache) feeds step ``--step`` of
``--scenario``, run three ways, in one Ray session (so Ray's background processes run during
all three):

* **bare**: ``csseg_core.engine.run_step`` in this process, torch limited to the threads a
  1-CPU Ray worker gets (Ray sets ``OMP_NUM_THREADS=1``), so the comparison isolates Ray;
* **trial**: launched the way ``sweeper/trial.py`` does: a Tune function trainable (the
  driver, ``sweeper.sweep.DRIVER_RESOURCES``) that runs one ``TorchTrainer`` (1 worker, 1 CPU,
  ``TuneReportCallback``, a checkpoint reported after the step); the worker ``ray.get``s the
  step-0 state from the object store and runs the same ``run_step``. Every phase is timed
  with ``time.perf_counter`` in the process where it happens, and stitched together with
  ``time.time()`` stamps (same machine clock) and the processes' creation times (psutil);
* **sweep** (when the scenario has exactly two steps and ``--step 1``): ``sweeper.run_sweep``
  with ``trials=1``, its step-0 cache seeded with the same state file, i.e. the real sweeper
  end to end (planning, Optuna, cache actor, Parquet tables).

Reported: the fixed overhead per trial (trial wall − run_step wall), the in-step throughput
ratio (trial / bare images/s of the training loop, target ≥ 0.95), the end-to-end ratio, a
phase breakdown, and cold reference costs measured in a fresh subprocess (imports, gloo
process-group set-up).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C


# ---------------------------------------------------------------------------- worker side
def _worker(loop: dict) -> None:
    """Ray Train worker: the body of ``sweeper.trial.train_worker`` for one step, instrumented.

    Writes absolute ``time.time()`` stamps of every phase boundary (same clock as the bench).
    """
    stamps = [("entry", time.time())]
    torch_preloaded = "torch" in sys.modules
    import psutil

    proc_created = psutil.Process().create_time()
    import _common  # bench helpers, via PYTHONPATH
    import ray
    import ray.train
    import torch

    import csseg_core.engine  # noqa: F401  (imported here, not inside the timed run_step)
    from csseg_core.config import ExperimentConfig
    from csseg_core.state import save_state, state_from_numpy

    cfg = ExperimentConfig.from_dict(loop["config"])
    stamps.append(("imports + config", time.time()))
    arrays = ray.get(loop["ref"][0])
    stamps.append(("ray.get state", time.time()))
    state = state_from_numpy(arrays)
    del arrays
    stamps.append(("state_from_numpy", time.time()))
    state, metrics, phases = _common.timed_run_step(cfg, loop["step"], state)
    stamps.append(("run_step", time.time()))
    with tempfile.TemporaryDirectory(prefix="csseg-ckpt-") as d:
        save_state(state, Path(d) / "state.pt")
        ray.train.report({"step": int(metrics["step"]), "miou_all": float(metrics["miou_all"]),
                          "images_per_s": float(metrics["images_per_s"])},
                         checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{loop['step']:03d}")
    stamps.append(("checkpoint + report", time.time()))
    out = {"proc_created": proc_created, "stamps": stamps, "step_phases": phases,
           "images_per_s": metrics["images_per_s"], "miou_all": metrics["miou_all"],
           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "torch_preloaded": torch_preloaded, "pid": os.getpid()}
    Path(loop["out"]).write_text(json.dumps(out))


def _driver(config: dict, ctx: dict) -> None:
    """Tune function trainable: the body of ``sweeper.trial.trial_driver``, instrumented."""
    t_entry = time.time()
    import psutil

    proc_created = psutil.Process().create_time()
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={**ctx["loop"], "out": ctx["worker_out"]},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1.0}),
        run_config=ray.train.RunConfig(name=trial_id, storage_path=ctx["storage"],
                                       failure_config=ray.train.FailureConfig(max_failures=1),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       callbacks=[TuneReportCallback()]),
    )
    t_fit = time.time()
    trainer.fit()
    t_fit_end = time.time()
    Path(ctx["driver_out"]).write_text(json.dumps({"proc_created": proc_created, "entry": t_entry, "fit": t_fit,
                                                   "fit_end": t_fit_end, "exit": time.time()}))


# ---------------------------------------------------------------------------- bench side
def run_bare(cfg, step: int, state0: dict, threads: int) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    meter = C.TreeCpu().start()
    try:
        t0 = time.perf_counter()
        _, metrics, phases = C.timed_run_step(cfg, step, state0)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {"wall_s": wall, "images_per_s": metrics["images_per_s"], "phases": phases,
            "miou_all": metrics["miou_all"], "threads": threads, "cpu": meter.stop()}


def run_trial(cfg, step: int, state0: dict, tmp: Path) -> dict:
    import ray
    from ray import tune

    from csseg_core.state import state_to_numpy
    from sweeper.sweep import DRIVER_RESOURCES

    ref = ray.put(state_to_numpy(state0))  # owned by this process, alive for the whole trial
    ctx = {"loop": {"config": cfg.to_dict(), "step": step, "ref": [ref]}, "storage": str(tmp / "train"),
           "worker_out": str(tmp / "worker.json"), "driver_out": str(tmp / "driver.json")}
    trainable = tune.with_resources(tune.with_parameters(_driver, ctx=ctx), DRIVER_RESOURCES)
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="overhead", storage_path=str(tmp / "tune"), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    meter = C.TreeCpu().start()
    t_start = time.time()
    p0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - p0
    t_end = time.time()
    cpu = meter.stop()
    if grid.errors:
        raise RuntimeError(f"trial failed: {grid.errors[0]}")
    w = json.loads((tmp / "worker.json").read_text())
    d = json.loads((tmp / "driver.json").read_text())
    # consecutive stamps (one clock, several processes): the phases add up to the wall time
    raw = [("Tune: trial actor process start", d["proc_created"]),
           ("Tune: trial actor init -> driver fn (imports)", d["entry"]),
           ("driver: imports + TorchTrainer set-up", d["fit"]),
           ("Train: controller + worker group start (until the worker process exists)", w["proc_created"]),
           ("worker: process start -> train fn (Ray worker init, torch import, gloo group)", w["stamps"][0][1]),
           *[(f"worker: {name}", t) for name, t in w["stamps"][1:]],
           ("Train: last report -> fit() returns (teardown)", d["fit_end"]),
           ("driver: exit", d["exit"]),
           ("Tune: driver exit -> Tuner.fit() returns", t_end)]
    timeline, prev = [], t_start
    for name, t in raw:
        t = max(t, prev)  # a pre-started process may predate the previous stamp
        timeline.append((name, t - prev))
        prev = t
    return {"wall_s": wall, "images_per_s": w["images_per_s"], "phases": w["step_phases"], "timeline": timeline,
            "miou_all": w["miou_all"], "threads": w["torch_threads"], "omp": w["omp_num_threads"],
            "torch_preloaded": w["torch_preloaded"], "cpu": cpu}


def _mean_runs(runs: list[dict]) -> dict:
    """Average the numeric figures of repeated runs (the last run's timeline and extras)."""
    out = dict(runs[-1])
    for k in ("wall_s", "images_per_s", "miou_all"):
        out[k] = sum(r[k] for r in runs) / len(runs)
    out["phases"] = {k: sum(r["phases"][k] for r in runs) / len(runs) for k in runs[-1]["phases"]}
    if "timeline" in out:
        out["timeline"] = [(name, sum(dict(r["timeline"])[name] for r in runs) / len(runs)) for name, _ in runs[-1]["timeline"]]
    return out


def run_via_sweep(cfg, scenario: str, method: str, overrides: dict, state_file: Path, tmp: Path) -> dict:
    """``sweeper.run_sweep`` with 1 trial, its step-0 cache seeded with the fixed state."""
    import pyarrow.parquet as pq

    from sweeper import SweepSpec, run_sweep

    name = "bench-overhead"
    C.seed_step0(tmp / "sweeps" / name, cfg, state_file)
    spec = SweepSpec(scenarios=(scenario,), method=method, trials=1, concurrency=1, storage=str(tmp / "sweeps"),
                     name=name, overrides=overrides, max_failures=0, verbose=0, seed=cfg.seed)
    t0 = time.perf_counter()
    sweep_dir = run_sweep(spec)
    wall = time.perf_counter() - t0
    steps = pq.read_table(sweep_dir / "steps.parquet").to_pylist()
    row = next(r for r in steps if r["step"] == 1)
    cached0 = next(r for r in steps if r["step"] == 0)["cached"]
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    return {"wall_s": wall, "step_wall_s": row["wall_s"], "images_per_s": row["images_per_s"],
            "miou_all": row["miou_all"], "step0_cached": bool(cached0), "trial_wall_s": trials[0]["wall_s"],
            "status": trials[0]["status"]}


def _cpu_rows(bare: dict, trial: dict, top: int = 12) -> list[list]:
    """CPU seconds per process name during the bare and the trial run (largest first)."""
    b, t = bare.get("cpu_s_by_process", {}), trial.get("cpu_s_by_process", {})
    names = sorted(set(b) | set(t), key=lambda n: -max(b.get(n, 0.0), t.get(n, 0.0)))[:top]
    rows = [[n, b.get(n, 0.0), t.get(n, 0.0)] for n in names]
    rows.append(["total (wall s)", f"{bare.get('tree_cpu_s', 0.0):.1f} ({bare.get('cpu_wall_s', 0.0):.0f})",
                 f"{trial.get('tree_cpu_s', 0.0):.1f} ({trial.get('cpu_wall_s', 0.0):.0f})"])
    rows.append(["whole machine busy", f"{100 * bare.get('machine_cpu_util', 0.0):.0f}%",
                 f"{100 * trial.get('machine_cpu_util', 0.0):.0f}%"])
    return rows


def _short(name: str) -> str:
    """``"Tune: trial actor process start"`` -> ``tune_trial_actor_process_start_s`` (row keys)."""
    head = name.split(" (")[0].split(" ->")[0]
    return re.sub(r"_+", "_", "".join(c if c.isalnum() else "_" for c in head.lower())).strip("_") + "_s"


COLD = r"""
import json, time, os, sys
t = {}
p = time.perf_counter(); import torch; t["import torch"] = time.perf_counter() - p
p = time.perf_counter(); import ray; t["import ray"] = time.perf_counter() - p
p = time.perf_counter(); import ray.train.torch, ray.tune; t["import ray.train.torch + ray.tune"] = time.perf_counter() - p
p = time.perf_counter(); import csseg_core.engine; t["import csseg_core.engine"] = time.perf_counter() - p
import socket, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
p = time.perf_counter()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
t["gloo init_process_group (world 1)"] = time.perf_counter() - p
p = time.perf_counter(); dist.destroy_process_group(); t["gloo destroy_process_group"] = time.perf_counter() - p
print(json.dumps(t))
"""


def cold_costs() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(C.ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, env=env, cwd=str(C.ROOT))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    C.add_run_args(p)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the bare run (a 1-CPU Ray worker gets 1)")
    p.add_argument("--repeats", type=int, default=1, help="bare/trial pairs, ABBA order, figures averaged")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweeper.run_sweep measurement")
    a = p.parse_args(argv)
    step_epochs = 8 if a.profile == "smoke" else 1
    cfg, overrides = C.bench_config(a, {"epochs": 1, "epochs_incremental": step_epochs, "num_samples": 0},
                                    quick={"epochs_incremental": 1, "crop_size": 48, "head_channels": 32})
    if not 1 <= a.step < cfg.num_steps:
        raise SystemExit(f"error: --step must be in 1..{cfg.num_steps - 1}")
    C.warm_data(cfg, range(a.step + 1))  # data generated, filter caches filled: outside every measurement
    state0, state_file = C.fixed_step0(cfg)
    if a.step > 1:  # chain the earlier incremental steps once (not measured)
        from csseg_core.engine import run_step

        for s in range(1, a.step):
            state0, _ = run_step(cfg, s, state0)

    print("[bench] cold costs in a fresh subprocess ...", flush=True)
    cold = cold_costs()
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    import ray

    ray_init_s = C.start_ray(a.dashboard, a.scenario)
    res: dict = {"cold": cold, "ray_init_s": ray_init_s}
    try:
        with tempfile.TemporaryDirectory(prefix="csseg-bench-overhead-") as tmp:
            bares, trials = [], []
            for i in range(a.repeats):  # ABBA order: drift in the machine's load hits both sides
                for kind in (("bare", "trial") if i % 2 == 0 else ("trial", "bare")):
                    if kind == "bare":
                        print(f"[bench] bare run_step (step {a.step}, {a.threads} thread(s)) ...", flush=True)
                        bares.append(run_bare(cfg, a.step, state0, a.threads))
                    else:
                        print("[bench] the same step inside a Ray Train trial ...", flush=True)
                        sub = Path(tmp) / f"trial{i}"
                        sub.mkdir()
                        trials.append(run_trial(cfg, a.step, state0, sub))
            res["bare"], res["trial"] = _mean_runs(bares), _mean_runs(trials)
            res["bare_runs"], res["trial_runs"] = bares, trials
            if not a.no_sweep and cfg.num_steps == 2 and a.step == 1:
                print("[bench] same step through sweeper.run_sweep (trials=1) ...", flush=True)
                (Path(tmp) / "sweep").mkdir()
                res["sweep"] = run_via_sweep(cfg, a.scenario, a.method, overrides, state_file, Path(tmp) / "sweep")
    finally:
        ray.shutdown()
    load1 = C.loadavg()

    bare, trial = res["bare"], res["trial"]
    overhead = trial["wall_s"] - trial["phases"]["run_step"]
    ratio = trial["images_per_s"] / bare["images_per_s"]
    e2e = bare["phases"]["run_step"] / trial["wall_s"]
    res["summary"] = {"bare_step_s": bare["phases"]["run_step"], "trial_wall_s": trial["wall_s"],
                      "trial_step_s": trial["phases"]["run_step"], "overhead_s": overhead,
                      "bare_img_s": bare["images_per_s"], "trial_img_s": trial["images_per_s"],
                      "throughput_ratio": ratio, "end_to_end_ratio": e2e}
    C.print_table(f"{a.scenario} step {a.step} ({a.method}, {a.profile}): bare vs Ray Train trial "
                  f"(load {load0:.2f} → {load1:.2f})",
                  ["run", "wall s", "run_step s", "train img/s", "threads", "mIoU"],
                  [["bare", bare["phases"]["run_step"], bare["phases"]["run_step"], bare["images_per_s"], bare["threads"],
                    bare["miou_all"]],
                   ["trial", trial["wall_s"], trial["phases"]["run_step"], trial["images_per_s"], trial["threads"],
                    trial["miou_all"]]]
                  + ([["run_sweep (1 trial)", res["sweep"]["wall_s"], res["sweep"]["step_wall_s"],
                       res["sweep"]["images_per_s"], "1", res["sweep"]["miou_all"]]] if "sweep" in res else []))
    C.print_table("run_step phases (s)", ["phase", "bare", "trial"],
                  [[k, bare["phases"].get(k, 0.0), trial["phases"].get(k, 0.0)] for k in trial["phases"]])
    C.print_table("trial timeline (s, in order)", ["phase", "seconds"], trial["timeline"])
    cpu_rows = _cpu_rows(bare["cpu"], trial["cpu"])
    C.print_table("CPU seconds by process (this process tree) while each side ran", ["process", "bare", "trial"],
                  cpu_rows)
    C.print_table("cold reference costs (fresh subprocess, s)", ["what", "seconds"],
                  [[k, v] for k, v in cold.items()] + [["ray.init (this sweep, once)", ray_init_s]])
    print(f"fixed overhead per trial: {overhead:.1f} s; training throughput trial/bare = {ratio:.3f} "
          f"(target >= 0.95); end to end (bare step / trial wall) = {e2e:.3f}")
    if "sweep" in res:
        sw = res["sweep"]
        print(f"run_sweep(trials=1): {sw['wall_s']:.1f} s for a {sw['step_wall_s']:.1f} s step -> "
              f"{sw['wall_s'] - sw['step_wall_s']:.1f} s of fixed cost (step 0 from the cache: {sw['step0_cached']})")
    C.dump_json(a.json, res)
    if not (a.quick or a.no_append):
        tl = dict(trial["timeline"])
        figures = {"bare_step_s": bare["phases"]["run_step"], "trial_wall_s": trial["wall_s"],
                   "overhead_s": overhead, "bare_img_s": bare["images_per_s"], "trial_img_s": trial["images_per_s"],
                   "throughput_ratio": ratio, "e2e_ratio": e2e,
                   **{_short(k): v for k, v in tl.items() if k != "worker: run_step"},
                   "datasets_bare_s": bare["phases"].get("datasets", 0.0),
                   "datasets_trial_s": trial["phases"].get("datasets", 0.0), "ray_init_s": ray_init_s,
                   "trial_tree_cpu_s": trial["cpu"].get("tree_cpu_s"),
                   "trial_worker_cpu_s": trial["cpu"].get("cpu_s_by_process", {}).get("RayTrainWorker"),
                   "machine_busy_bare": bare["cpu"].get("machine_cpu_util"),
                   "machine_busy_trial": trial["cpu"].get("machine_cpu_util")}
        if "sweep" in res:
            figures.update(sweep_wall_s=res["sweep"]["wall_s"], sweep_step_s=res["sweep"]["step_wall_s"],
                           sweep_overhead_s=res["sweep"]["wall_s"] - res["sweep"]["step_wall_s"],
                           sweep_img_s=res["sweep"]["images_per_s"])
        settings = {"scenario": a.scenario, "method": a.method, "step": a.step, "profile": a.profile, "repeats": a.repeats,
                    **{k: v for k, v in overrides.items() if k != "num_samples"}, "bare_threads": a.threads,
                    "worker_threads": trial["threads"], "dashboard": a.dashboard}
        C.append_row("trial_overhead", settings, figures, (load0, load1))
    return res


if __name__ == "__main__":
    main()
