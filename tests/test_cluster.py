"""Sweeps on a real multi-node Ray cluster on this machine (``cluster_fixtures.LocalCluster``).

One module-scoped cluster: a head (dashboard on, 1 CPU) + a worker node (1 CPU), each with its
own raylet and object store, stopped by the pids the fixture started. The pytest process never
joins it (the session may run its own local Ray): every sweep is a subprocess,
``python cli.py sweep ... --address HOST:PORT`` or ``ray job submit ... -- python cli.py sweep``.

* a 2-trial sweep at concurrency 2: one trial per node (1 CPU each), step 0 trained once on
  one node and read by the trial on the other node through the object store (no file);
* the driver killed mid-step, then the sweep resumed on the same cluster as a Ray Job (``ray job
  submit ... --resume``): logs through ``ray job logs``, finished steps not re-run, same layout;
* node loss: the worker node's raylet SIGKILLed while its trial is inside a step; the trial is
  retried on the head from its last step checkpoint and every trial is in the tables once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_fixtures import ROOT, two_node_cluster_fixture  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ("epochs=1", "epochs_incremental=1", "crop_size=48", "head_channels=32", "num_samples=0")


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory):
    """The tiny synthetic VOC of ``ray_fixtures.tiny_voc`` (240/60 images of 64 px), for this module."""
    from csseg_core.data.synth import generate

    return str(generate(tmp_path_factory.mktemp("cluster-voc"), "voc", n_train=240, n_val=60, size=64, seed=0))


def sweep_args(storage: Path, name: str, data_root: str, *extra: str, sets: tuple[str, ...] = TINY) -> list[str]:
    return ["sweep", "voc-19-1", "--method", "lwf", "--trials", "2", "--concurrency", "2", "--max-failures", "0",
            "--storage", str(storage), "--name", name, "--data-root", data_root,
            *(a for kv in sets for a in ("--set", kv)), *extra]


def rows(sweep_dir: Path, table: str) -> list[dict]:
    return pq.read_table(sweep_dir / table).to_pylist()


@pytest.fixture(scope="module")
def cli_sweep(two_node_cluster, cluster_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cluster-sweeps")
    cmd = [sys.executable, str(ROOT / "cli.py"), *sweep_args(storage, "two-nodes", cluster_data),
           "--address", two_node_cluster.address]
    out = subprocess.run(cmd, env=two_node_cluster.env, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return storage / "two-nodes", out.stdout


def test_trials_run_on_both_nodes_and_read_step0_across_nodes(cli_sweep, two_node_cluster):
    sweep_dir, stdout = cli_sweep
    nodes = two_node_cluster.node_ids
    trials = rows(sweep_dir, "trials.parquet")
    assert len(trials) == 2 and all(t["status"] == "ok" and t["steps_done"] == 2 for t in trials), trials
    assert all(len(t["node_ids"]) == 1 for t in trials)
    assert {t["node_ids"][0] for t in trials} == {nodes["head"], nodes["w1"]}  # one trial per node
    trainer = next(t for t in trials if t["step0_source"] == "trained")
    reader = next(t for t in trials if t["step0_source"] == "object_store")
    assert reader["step0_node_id"] == trainer["node_ids"][0] != reader["node_ids"][0]
    # the cache actor (and so every step-0 object) lives on the driver's node, the head, not a worker node
    assert trainer["step0_store_node_id"] == reader["step0_store_node_id"] == nodes["head"]
    steps = rows(sweep_dir, "steps.parquet")
    assert {(r["trial_id"], r["step"]) for r in steps} == {(t["trial_id"], s) for t in trials for s in (0, 1)}
    assert all(r["worker_node_ids"] == [r["node_id"]] for r in steps)
    read = next(r for r in steps if r["trial_id"] == reader["trial_id"] and r["step"] == 0)
    assert read["cached"] and read["step0_get_s"] > 0
    info = json.loads((sweep_dir / "sweep.json").read_text())
    cross = int(reader["node_ids"][0] != nodes["head"])  # the reader pulled the state from the head's store
    assert info["step0"] == {"trained": 1, "trained_this_run": 1, "reused": 1, "loaded_from_files": 0,
                             "object_store_reads": 1, "cross_node_reads": cross}
    assert f"read 1 time(s) from the object store ({cross} from another node), loaded 0 time(s) from files" in stdout


def _mid_step2_on(sweep_dir: Path, node_id: str | None) -> str | None:
    """The trial whose worker runs on ``node_id`` (None: any node), once Ray Train holds its step-1
    checkpoint and step 2 has not finished (its step-2 row is not written), else None."""
    for row_dir in (sweep_dir / "rows").glob("*") if (sweep_dir / "rows").is_dir() else ():
        step1 = row_dir / "step-001.json"
        snapshot = sweep_dir / "train" / row_dir.name / "checkpoint_manager_snapshot.json"
        try:
            on_node = node_id is None or json.loads(step1.read_text()).get("node_id") == node_id
            registered = '"step-001"' in snapshot.read_text()
        except (OSError, ValueError):  # not written yet (or half written)
            continue
        if on_node and registered and not (row_dir / "step-002.json").exists():
            return row_dir.name
    return None


def _registered_steps(sweep_dir: Path) -> dict[str, int]:
    """Trial id -> the last step whose checkpoint Ray Train's snapshot registers (trials without one left out)."""
    out = {}
    for snapshot in (sweep_dir / "train").glob("*/checkpoint_manager_snapshot.json"):
        try:
            names = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            continue
        if names:
            out[snapshot.parent.name] = max(int(n.split("-")[1]) for n in names)
    return out


def _run_until(args: list[str], env: dict, log_path: Path, ready) -> tuple[subprocess.Popen, str]:
    """Start ``cli.py *args`` in its own session and poll ``ready()`` until it returns a trial id."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], env=env, cwd=str(ROOT),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    found, deadline = None, time.monotonic() + 900  # a bound on a hang, not a timing check
    while found is None and proc.poll() is None and time.monotonic() < deadline:
        found = ready()
        time.sleep(0.1)
    if found is None:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        pytest.fail(f"no trial reached step 2 (rc={proc.poll()}):\n{log_path.read_text()[-3000:]}")
    return proc, found


def test_driver_killed_then_resumed_as_a_ray_job(cli_sweep, two_node_cluster, cluster_data, tmp_path):
    """The sweep's driver (``cli.py sweep --address``) SIGKILLed while a trial is inside step 2 of 3: the
    cluster keeps running (the trial actors die with their owner, the detached step-0 cache lives on).
    ``ray job submit -- python cli.py sweep ... --resume`` (no --address: the job's RAY_ADDRESS) finishes
    it on the same cluster: logs through ``ray job logs``, every trial once, a step whose checkpoint
    Ray Train held at the kill is not run again, step 0 trained once, the folder laid out as a CLI sweep's."""
    storage = tmp_path / "sweeps"
    args = sweep_args(storage, "driver-kill", cluster_data, sets=(*TINY, "epochs_incremental=2"))
    args[1] = "voc-10-5-5"  # 3 steps
    sweep_dir = storage / "driver-kill"
    proc, victim = _run_until([*args, "--address", two_node_cluster.address], two_node_cluster.env,
                              tmp_path / "first.out", lambda: _mid_step2_on(sweep_dir, None))
    os.killpg(proc.pid, 9)  # the driver and its own children only: the cluster's processes are not in its session
    proc.wait()
    registered = _registered_steps(sweep_dir)  # steps whose checkpoint Ray Train holds: finished for good
    before = {(r.parent.name, r.name): r.read_text() for r in (sweep_dir / "rows").glob("*/step-*.json")
              if int(r.stem.split("-")[1]) <= registered.get(r.parent.name, -1)}
    assert (victim, "step-001.json") in before and (victim, "step-002.json") not in before, (registered, sorted(before))

    ray_cli = str(Path(sys.executable).with_name("ray"))
    job_id = f"csseg-resume-{os.getpid()}-{int(time.time())}"
    submit = [ray_cli, "job", "submit", "--address", two_node_cluster.dashboard_url, "--submission-id", job_id,
              "--", sys.executable, str(ROOT / "cli.py"), *args, "--resume"]
    out = subprocess.run(submit, env=two_node_cluster.env, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    logs = subprocess.run([ray_cli, "job", "logs", "--address", two_node_cluster.dashboard_url, job_id],
                          env=two_node_cluster.env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "[csseg sweep] done in" in logs.stdout and "2 ok" in logs.stdout, logs.stdout[-3000:]

    trials = rows(sweep_dir, "trials.parquet")
    assert len(trials) == 2 == len({t["trial_id"] for t in trials}), trials
    assert all(t["status"] == "ok" and t["steps_done"] == 3 for t in trials), trials
    steps = rows(sweep_dir, "steps.parquet")
    assert sorted((r["trial_id"], r["step"]) for r in steps) == sorted((t["trial_id"], s) for t in trials for s in range(3))
    after = {(r.parent.name, r.name): r.read_text() for r in (sweep_dir / "rows").glob("*/step-*.json")}
    for key, text in before.items():
        assert after[key] == text, f"{key} was re-run after --resume (registered at the kill: {registered})"
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "complete" and info["step0"]["trained"] == 1, info
    cli_dir = cli_sweep[0]  # the same layout and columns as a sweep run from the CLI

    def layout(d: Path) -> set[str]:  # the Optuna log is named after the cell (another scenario here)
        return {"optuna-<cell>.log" if p.name.startswith("optuna-") else p.name for p in d.iterdir()}

    assert layout(sweep_dir) == layout(cli_dir)
    for table in ("trials.parquet", "steps.parquet"):
        assert set(pq.read_schema(sweep_dir / table).names) == set(pq.read_schema(cli_dir / table).names)


def test_worker_node_lost_mid_step_trial_goes_on_from_its_checkpoint(two_node_cluster, cluster_data, tmp_path):
    """The worker node's raylet SIGKILLed while its trial is inside step 2 of a 3-step scenario: Ray Train
    restarts that trial's worker group on the head (``--max-failures 1``) from its step-1 checkpoint; the
    sweep completes, every trial is in trials.parquet once, and steps 0 and 1 are not run again.

    Runs last in this module: it takes the module cluster's worker node down for good."""
    nodes = two_node_cluster.node_ids
    storage, log_path = tmp_path / "sweeps", tmp_path / "sweep.out"
    args = sweep_args(storage, "node-loss", cluster_data, "--address", two_node_cluster.address,
                      sets=(*TINY, "epochs_incremental=6"))  # step 2 lasts ~5 s: the kill lands inside it
    args[1], args[args.index("--max-failures") + 1] = "voc-10-5-5", "1"  # 3 steps; one retry
    sweep_dir = storage / "node-loss"
    proc, victim = _run_until(args, two_node_cluster.env, log_path, lambda: _mid_step2_on(sweep_dir, nodes["w1"]))
    try:
        two_node_cluster.kill_raylet("w1")
        before = {p.name: p.read_text() for p in (sweep_dir / "rows" / victim).glob("step-*.json")}
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert sorted(before) == ["step-000.json", "step-001.json"], sorted(before)  # killed inside step 2
    trials = rows(sweep_dir, "trials.parquet")
    assert sorted(t["trial_id"] for t in trials) == sorted({t["trial_id"] for t in trials}) and len(trials) == 2, trials
    assert all(t["status"] == "ok" and t["steps_done"] == 3 for t in trials), trials
    steps = rows(sweep_dir, "steps.parquet")
    assert sorted((r["trial_id"], r["step"]) for r in steps) == sorted((t["trial_id"], s) for t in trials for s in range(3))
    after = {p.name: p.read_text() for p in (sweep_dir / "rows" / victim).glob("step-*.json")}
    for name in before:  # steps 0 and 1 of the node-loss trial were not run again: their rows are unchanged
        assert after[name] == before[name], f"{name} of {victim} was re-run after the node loss"
    redone = next(r for r in steps if r["trial_id"] == victim and r["step"] == 2)
    assert redone["node_id"] == nodes["head"]  # the retry ran where a node was left
    assert set(next(t for t in trials if t["trial_id"] == victim)["node_ids"]) == {nodes["head"], nodes["w1"]}
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["status"] == "complete" and info["step0"]["trained"] == 1, info
