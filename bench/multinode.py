"""The same sweep on one 2-CPU node vs two 1-CPU nodes (wall-time ratio, cross-node step-0 handoff).

    python bench/multinode.py                     # 4 trials of voc-15-5 SDR smoke on each layout (~15 min)
    python bench/multinode.py --quick             # 2 tiny trials each, no row appended

Each layout is a fresh local cluster started like ``tests/cluster_fixtures.LocalCluster``
(``ray start --block`` per node, own ports, its own token; stopped by its pids): ``one`` = a
head with 2 CPUs, ``two`` = a head and a worker node with 1 CPU each. The sweep runs as
``python cli.py sweep ... --address HOST:PORT`` (a subprocess, like a user on the head), at
concurrency 2, so each layout runs two 1-CPU trials at a time. Figures, read back from the
sweep folders: sweep wall time (``sweep.json``) and the ratio two / one; the step-0 ``ray.get``
times of the trials that read the cached state (``step0_get_s`` of ``steps.parquet``), split
into same-node and cross-node reads (reader node ≠ the cache actor's node).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))
from cluster_fixtures import LocalCluster  # noqa: E402


def run_layout(layout: str, a, overrides: dict, storage: Path, port: int) -> dict:
    cpus, workers = (2, 0) if layout == "one" else (1, 1)
    started = time.perf_counter()
    with LocalCluster(base_port=port, workers=workers, cpus=cpus, dashboard=a.dashboard) as cluster:
        up_s = time.perf_counter() - started
        cmd = [sys.executable, str(C.ROOT / "cli.py"), "sweep", a.scenario, "--method", a.method, "--trials", str(a.trials),
               "--concurrency", "2", "--max-failures", "0", "--storage", str(storage), "--name", f"bench-{layout}",
               "--profile", a.profile, "--address", cluster.address,
               *(x for k, v in overrides.items() for x in ("--set", f"{k}={v}"))]
        out = subprocess.run(cmd, env=cluster.env, cwd=str(C.ROOT), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"[bench] sweep on layout {layout} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    from sweeper.tables import STEPS, read_table

    sweep_dir = storage / f"bench-{layout}"
    info = json.loads((sweep_dir / "sweep.json").read_text())
    reads = [r for r in read_table(sweep_dir, STEPS) if r["step"] == 0 and r.get("step0_source") == "object_store"]
    cross = [r["step0_get_s"] for r in reads if r["node_id"] != r.get("step0_store_node_id")]
    same = [r["step0_get_s"] for r in reads if r["node_id"] == r.get("step0_store_node_id")]
    figures = C.sweep_figures(sweep_dir)
    return {"cluster_up_s": up_s, "wall_s": info["wall_s"], "trials_ok": figures["trials_ok"],
            "nodes": len({n for r in read_table(sweep_dir, STEPS) for n in (r.get("worker_node_ids") or [])}),
            "step0": info["step0"], "cross_get_s": cross, "same_get_s": same}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    C.add_run_args(p, trials=4)
    p.add_argument("--order", default="one,two", help="layouts, in the order they run")
    p.add_argument("--port", type=int, default=27300, help="first port of the local clusters")
    a = p.parse_args(argv)
    cfg, overrides = C.bench_config(a, {"epochs": 1, "epochs_incremental": 2, "num_samples": 0},
                                    quick={"epochs_incremental": 1, "crop_size": 48, "head_channels": 32})
    C.warm_data(cfg, range(cfg.num_steps))
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    res: dict = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="csseg-bench-multinode-") as tmp:
        for i, layout in enumerate(a.order.split(",")):
            print(f"[bench] layout {layout}: {a.trials} trials of {a.scenario} ...", flush=True)
            res["runs"][layout] = run_layout(layout, a, overrides, Path(tmp), a.port + 200 * i)
    load1 = C.loadavg()
    runs = res["runs"]
    ratio = runs["two"]["wall_s"] / runs["one"]["wall_s"] if {"one", "two"} <= set(runs) else float("nan")
    res["summary"] = {"ratio_two_over_one": ratio}
    C.print_table(f"{a.trials} trials of {a.scenario} ({a.method}, {a.profile}), concurrency 2 "
                  f"(load {load0:.2f} → {load1:.2f})",
                  ["layout", "cluster up s", "sweep wall s", "trials ok", "nodes used", "step0 reads",
                   "cross-node get s (median)", "same-node get s (median)"],
                  [[k, r["cluster_up_s"], r["wall_s"], r["trials_ok"], r["nodes"], r["step0"]["object_store_reads"],
                    _median(r["cross_get_s"]), _median(r["same_get_s"])] for k, r in runs.items()])
    print(f"wall time two 1-CPU nodes / one 2-CPU node = {ratio:.2f}")
    C.dump_json(a.json, res)
    if not (a.quick or a.no_append):
        figures = {"ratio_two_over_one": ratio}
        for k, r in runs.items():
            figures.update({f"{k}.wall_s": r["wall_s"], f"{k}.trials_ok": r["trials_ok"], f"{k}.nodes": r["nodes"],
                            f"{k}.step0_reads": r["step0"]["object_store_reads"],
                            f"{k}.cross_node_reads": len(r["cross_get_s"]),
                            f"{k}.cross_get_s": _median(r["cross_get_s"]), f"{k}.same_get_s": _median(r["same_get_s"])})
        settings = {"scenario": a.scenario, "method": a.method, "trials": a.trials, "profile": a.profile,
                    **{k: v for k, v in overrides.items() if k != "num_samples"}, "order": a.order,
                    "concurrency": 2, "dashboard": a.dashboard}
        C.append_row("multinode", settings, figures, (load0, load1))
    return res


if __name__ == "__main__":
    main()
