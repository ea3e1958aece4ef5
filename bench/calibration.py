"""The smoke profile's calibration table: FT / SDR / MiB on voc-15-1 and the joint upper bound,
on several differently generated VOC-layout datasets, mean ± std over seeds (docs/CALIBRATION.md).

    python bench/calibration.py                                   # 3 datasets x 2 seeds (~30 min on 2 cores)
    python bench/calibration.py --datasets default,/data/my-voc --seeds 3 --out /tmp/cal
    python bench/calibration.py --quick                           # sanity run, no row appended

Every run is what a user types: ``python cli.py train voc-15-1 --method M --seed S
[--data-root D] --out OUT/runs/<dataset>-<run name>`` and ``python cli.py train voc-offline``
for the joint bound, one after the other, with ``CSSEG_HOME=OUT/home`` (SDR runs first, so the
shared step 0 of each (dataset, seed) is trained once, with SDR's prototypes, and FT / MiB reuse
it). A run whose ``steps.parquet`` already holds every step is read, not run again (its folder is named
after the configuration's key, so other ``--set`` values make other runs): re-running the script on
the same ``--out`` finishes an interrupted table.

Datasets: ``default`` (the embedded set, 1200 train / 300 val, 96 px), ``blobs`` and ``polygons``
(``csseg data synth --style blobs --train 300 --val 200 --seed 1 --size 96`` and ``--style polygons
... --seed 2 --size 80``, generated under ``OUT/data``), their ``-clutter1`` / ``-clutter3`` versions
(the same data with ``--clutter 1`` / ``3``: unlabelled background objects), or the path of any
VOC-layout data root.

The table, per dataset and method: step-0 test mIoU, final (last step) test old / new and validation
old / new as mean ± std over the seeds; per seed, how many new classes are "learnable" under the
method's kd (``csseg background-shift``: at least half their test pixels lie where the loss's minimum
is the new class; docs/CALIBRATION.md section l); and whether issue 9's targets hold on the means
(step 0 ≥ 0.60, joint ≥ 0.70, FT final old ≤ 0.15, SDR and MiB final old ≥ 0.45 and new ≥ 0.15).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

VARIANTS = {  # name -> `csseg data synth` arguments
    "blobs": ["--style", "blobs", "--train", "300", "--val", "200", "--seed", "1", "--size", "96"],
    "polygons": ["--style", "polygons", "--train", "300", "--val", "200", "--seed", "2", "--size", "80"],
}
# the same labelled objects with up to N unlabelled ones in the background (docs/CALIBRATION.md section l)
VARIANTS.update({f"{name}-clutter{n}": [*args, "--clutter", str(n)] for name, args in list(VARIANTS.items())
                 for n in (1, 3)})
METHODS = ("sdr", "ft", "mib")  # SDR first: its step 0 holds the prototypes, FT and MiB reuse it
TARGETS = {"step0": 0.60, "joint": 0.70, "ft_old_max": 0.15, "old": 0.45, "new": 0.15}


def cli(*args: str, env: dict, log: Path) -> float:
    """Run ``python cli.py ARGS`` (output to ``log``); its wall seconds. Raises on a non-zero exit."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, str(C.ROOT / "cli.py"), *args], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"[bench] `csseg {' '.join(args)}` failed (exit {rc}): {tail[0]} (log: {log})")
    return time.perf_counter() - t0


def data_root(name: str, out: Path, env: dict) -> str | None:
    """The data root of a dataset name (generated on first use), None for the embedded set."""
    if name == "default":
        return None
    if name not in VARIANTS:
        if not Path(name).exists():
            raise SystemExit(f"[bench] unknown dataset {name!r}: use default, {', '.join(VARIANTS)} or an existing data root")
        return str(Path(name).resolve())
    root = out / "data" / name
    if not root.exists():
        cli("data", "synth", "--root", str(root), *VARIANTS[name], env=env, log=out / f"synth-{name}.log")
    return str(root)


def finished_rows(run: Path, n_steps: int) -> list[dict] | None:
    """The rows of a run's ``steps.parquet`` when it holds all ``n_steps`` steps, else None."""
    from csseg_core.results import read_rows

    rows = sorted(read_rows(run / "steps.parquet"), key=lambda r: r["step"])
    return rows if len(rows) >= n_steps else None


def learnable_classes(run: Path, home: str) -> int:
    """New classes of which the unbiased losses let at least half the pixels go to the class under the run's
    kd (``csseg background-shift``'s "learnable" >= 0.5; docs/CALIBRATION.md section l)."""
    from csseg_core.evaluation import background_shift

    old = os.environ.get("CSSEG_HOME")
    os.environ["CSSEG_HOME"] = home  # the runs' own home: the embedded dataset lives there
    try:
        return sum(r["learnable"] >= 0.5 for r in background_shift(run))
    finally:
        if old is None:
            os.environ.pop("CSSEG_HOME", None)
        else:
            os.environ["CSSEG_HOME"] = old


def run_all(a, out: Path) -> tuple[list[dict], float]:
    """Run (or read) every (dataset, seed, method) run; one record per run."""
    from csseg_core.config import parse_set, resolve_config

    env = {**os.environ, "CSSEG_HOME": str(out / "home")}
    records, total = [], 0.0
    for ds in a.datasets:
        root = data_root(ds, out, env)
        for seed in range(a.seeds):
            for method, scenario in [(m, a.scenario) for m in a.methods] + ([("joint", "voc-offline")] if a.joint else []):
                cfg = resolve_config(scenario, "ft" if method == "joint" else method, profile=a.profile, seed=seed,
                                     data_root=root, overrides=parse_set(a.sets))
                tag = f"{Path(ds).name}-{seed}-{method}"
                run = out / "runs" / f"{Path(ds).name}-{cfg.run_name()}"  # the config's key: other --set, other run
                n_steps = cfg.num_steps
                rows, wall = finished_rows(run, n_steps), float("nan")
                if rows is None:
                    args = ["train", scenario, "--method", cfg.method, "--seed", str(seed),
                            "--out", str(run), "--profile", a.profile, "--no-progress", *(["--data-root", root] if root else []),
                            *[x for s in a.sets for x in ("--set", s)]]
                    wall = cli(*args, env=env, log=out / f"log-{tag}.txt")
                    total += wall
                    rows = finished_rows(run, n_steps)
                first, last = rows[0], rows[-1]
                rec = {"dataset": Path(ds).name, "seed": seed, "method": method, "wall_s": wall,
                       "step0": first["miou_all"], "old": last["miou_old"], "new": last["miou_new"],
                       "val_old": last["val_miou_old"], "val_new": last["val_miou_new"],
                       "learnable": float("nan") if method == "joint" else float(learnable_classes(run, env["CSSEG_HOME"]))}
                records.append(rec)
                print(f"[bench] {tag}: step 0 {rec['step0']:.3f} final old {_f(rec['old'])} new {_f(rec['new'])} "
                      f"({'read' if math.isnan(wall) else f'{wall:.0f} s'})", flush=True)
    return records, total


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def verdict(method: str, m: dict) -> str:
    """Issue 9's targets on the means of one (dataset, method) group."""
    t = TARGETS
    if method == "joint":
        checks = {f"joint ≥ {t['joint']}": m["step0"] >= t["joint"]}
    elif method == "ft":
        checks = {f"step 0 ≥ {t['step0']}": m["step0"] >= t["step0"], f"old ≤ {t['ft_old_max']}": m["old"] <= t["ft_old_max"]}
    else:
        checks = {f"old ≥ {t['old']}": m["old"] >= t["old"], f"new ≥ {t['new']}": m["new"] >= t["new"]}
    failed = [k for k, ok in checks.items() if not ok]
    return "met" if not failed else "NOT met: " + ", ".join(failed)


def table(records: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    from sweeper.reeval import mean_std

    columns = ["dataset", "method", "seeds", "step 0", "final old", "final new", "val old", "val new",
               "learnable new classes", "targets"]
    rows, figures = [], {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    for (ds, method), recs in groups.items():
        stats = {k: mean_std([r[k] for r in recs]) for k in ("step0", "old", "new", "val_old", "val_new", "learnable")}
        means = {k: v["mean"] for k, v in stats.items()}
        cells = [f"{_f(v['mean'])} ± {_f(v['std'])}" if v["n"] > 1 else _f(v["mean"]) for v in stats.values()]
        cells[-1] = "–" if method == "joint" else " / ".join(str(int(r["learnable"])) for r in recs)  # per seed
        rows.append([ds, method, str(len(recs)), *cells, verdict(method, means)])
        key = f"{ds}/{method}"
        figures[key] = (f"{_f(means['step0'])}" if method == "joint" else
                        f"old {_f(means['old'])}±{_f(stats['old']['std'])} new {_f(means['new'])}±{_f(stats['new']['std'])}")
    return columns, rows, figures


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", default="default,blobs,polygons", help="comma-separated: default, blobs, polygons, "
                   "blobs-clutter1|3, polygons-clutter1|3 or a data root")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per dataset")
    p.add_argument("--methods", default=",".join(METHODS), help="methods run on --scenario")
    p.add_argument("--scenario", default="voc-15-1")
    p.add_argument("--no-joint", dest="joint", action="store_false", help="skip the joint (voc-offline) bound")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value override for every run")
    p.add_argument("--out", default=None, help="where runs, data and calibration.md go (default: the bench home)")
    a = p.parse_args()
    a.datasets = [d for d in a.datasets.split(",") if d]
    a.methods = [m for m in a.methods.split(",") if m]
    if a.seeds < 1:
        raise SystemExit("[bench] --seeds must be >= 1")
    if a.quick:
        a.sets = ["iters=20", "iters_incremental=4", *a.sets]
        a.seeds = min(a.seeds, 1)
    out = Path(a.out or (C.bench_home() / ("calibration-quick" if a.quick else "calibration"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = C.wait_for_load(a.max_load, enabled=not a.no_wait)
    records, total = run_all(a, out)
    columns, rows, figures = table(records)
    C.print_table(f"calibration: {a.scenario}, profile {a.profile}{' ' + ' '.join(a.sets) if a.sets else ''}, "
                  f"mean ± std over {a.seeds} seed(s)", columns, rows)
    from csseg_core.results import markdown_table

    md = markdown_table(columns, rows) + "\n"
    (out / "calibration.md").write_text(md)
    print(md)
    print(f"[bench] table written to {out / 'calibration.md'}; {total:.0f} s of runs")
    if not (a.quick or a.no_append):
        settings = {"scenario": a.scenario, "datasets": ",".join(a.datasets), "seeds": a.seeds, "sets": " ".join(a.sets) or "-"}
        C.append_row("calibration", settings, figures, (load0, C.loadavg()))


if __name__ == "__main__":
    main()
