"""Hardening of ``sweeper``: its API refuses empty or malformed input with a ``ConfigError``, the
sweep tables ignore half-written fragments, and a sweep process killed with SIGKILL during a step
resumes from its last step checkpoint with each trial exactly once in the tables
(``tests/test_sweeper_e2e.py`` covers a restore after an interrupted cell, not a SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hardening_fixtures import ROOT, isolated_fixture, voc_template_fixture  # noqa: F401  (fixtures)

from csseg_core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("isolated")


def test_sweeper_api_rejects_empty_results_dir(tmp_path):
    from sweeper import export_best, leaderboard

    with pytest.raises(ConfigError, match="not a sweep folder"):
        leaderboard(tmp_path)
    with pytest.raises(ConfigError, match="not a sweep folder"):
        export_best(tmp_path, None, tmp_path / "best.yaml")


def test_sweeper_api_rejects_zero_trials(tmp_path):
    from sweeper import SweepSpec, plan_sweep

    with pytest.raises(ConfigError, match="trials"):
        plan_sweep(SweepSpec(scenarios=("voc-15-1",), trials=0, storage=str(tmp_path)))


def test_load_best_malformed_yaml_is_a_config_error(tmp_path):
    from sweeper import load_best

    bad = tmp_path / "bad.yaml"
    bad.write_text("cells: [1, 2\n")
    with pytest.raises(ConfigError):
        load_best(bad)


def test_sweep_tables_ignore_half_written_fragments(tmp_path):
    from sweeper.export import leaderboard
    from sweeper.tables import STEPS, TRIALS, merge_trial, read_table, rows_dir, write_json, write_step_fragment

    sweep = tmp_path / "sdr-x"
    write_json(sweep / "sweep.json", {"name": "sdr-x", "identity": {"metric": "miou_all", "space": {}}})
    for t in ("a", "b"):
        write_json(rows_dir(sweep, t) / "meta.json", {"sweep": "sdr-x", "cell": "voc-15-5-disjoint", "trial_id": t,
                                                     "scenario": "voc-15-5", "mode": "disjoint", "method": "sdr",
                                                     "profile": "smoke", "seed": 0, "num_steps": 2, "hp": {}})
        for s in (0, 1):
            write_step_fragment(sweep, t, {"trial_id": t, "step": s, "status": "ok", "miou_all": 0.5 + s / 10,
                                           "wall_s": 1.0, "cached": s == 0 and t == "b"})
        write_json(rows_dir(sweep, t) / "trial.json", {"status": "ok", "error": None, "wall_s": 3.0})
        merge_trial(sweep, t)
    # a writer killed mid-write leaves hidden temporary files: fragments and tables
    (rows_dir(sweep, "a") / ".step-002.json.k1ll3d").write_text('{"trial_id": "a", "st')
    (sweep / ".trials.parquet.x.tmp").write_bytes((sweep / TRIALS).read_bytes()[:40])
    merge_trial(sweep, "a")  # merged again after a restart: idempotent
    steps = read_table(sweep, STEPS)
    assert sorted((r["trial_id"], r["step"]) for r in steps) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert sorted(r["trial_id"] for r in read_table(sweep, TRIALS)) == ["a", "b"]
    assert sorted(r["trial_id"] for r in leaderboard(sweep, "miou_all")) == ["a", "b"]


# ---------------------------------------------------------------------------- SIGKILL a sweep
def _psutil():
    """psutil, or the copy Ray vendors (``ray/thirdparty_files``, on sys.path once ray is imported)."""
    try:
        import psutil
    except ImportError:
        ray = pytest.importorskip("ray")  # noqa: F841
        import psutil
    return psutil


def _descendants(pid: int) -> list[int]:
    psutil = _psutil()

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep process, its process group and every descendant it started (by pid)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _sweep_cmd(storage: Path, *extra: str) -> list[str]:
    """A 1-trial, 3-step sweep on the default synthetic dataset (no --data-root: see the test)."""
    exe = Path(sys.executable).with_name("csseg")
    base = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "cli.py")]
    sets = ["epochs=1", "epochs_incremental=20", "crop_size=48", "head_channels=32", "num_samples=0", "batch_size=8"]
    return base + ["sweep", "voc-10-5-5", "--method", "lwf", "--trials", "1", "--concurrency", "1", "--storage",
                   str(storage), "--name", "killed", "--max-failures", "0", "--seed", "0",
                   "--no-dashboard", *[x for kv in sets for x in ("--set", kv)], *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_killed_mid_step_resumes_from_its_step_checkpoint(tmp_path, voc_template):
    """`csseg sweep` SIGKILLed (with its Ray processes) during step 2 of a 3-step trial, then rerun with
    --resume: the trial goes on from its step-1 checkpoint and every table holds it exactly once.

    The resumed run is also the check of the calm console (issue 12): without a terminal it prints
    plain progress lines (at most 40 lines from start to leaderboard), the synthetic-data note once,
    and Ray's/Tune's/the workers' output lands in ``<sweep>/sweep.log``. No --data-root: the tiny
    template stands in for the default synthetic dataset of the private CSSEG_HOME."""
    from csseg_core.data import synth

    _psutil()
    storage, home = tmp_path / "sweeps", tmp_path / "home"
    shutil.copytree(voc_template, home / "synthetic" / synth.default_target("voc").name)
    env = {**os.environ, "CSSEG_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_sweep_cmd(storage), stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(tmp_path), start_new_session=True)
    sweep = storage / "killed"
    deadline = time.monotonic() + 300  # Ray start-up alone can take 2 min on a loaded 2-core box
    step1 = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            frags = list((sweep / "rows").glob("*/step-001.json")) if (sweep / "rows").is_dir() else []
            snaps = list((sweep / "train").glob("*/checkpoint_manager_snapshot.json")) if (sweep / "train").is_dir() else []
            own = list((sweep / "train").glob("*/last-step.pt")) if (sweep / "train").is_dir() else []
            # Ray Train registered the checkpoint, or the in-process trial wrote its own (sweeper.trial.trains_in_process)
            if frags and (own or any('"step-001"' in p.read_text() for p in snaps)):
                step1 = frags[0]
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the sweep never finished step 1 (rc={proc.poll()}):\n"
                        f"{(tmp_path / 'first.log').read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            _kill_tree(proc)  # SIGKILL during step 2
        log.close()
    trial_id = step1.parent.name
    before = {p.name: p.read_text() for p in step1.parent.glob("step-*.json")}
    assert "step-001.json" in before and "step-002.json" not in before, sorted(before)

    logged = (sweep / "sweep.log").stat().st_size if (sweep / "sweep.log").exists() else 0
    done = subprocess.run(_sweep_cmd(storage, "--resume"), capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=240, start_new_session=True)
    (tmp_path / "second.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # the calm console: plain lines (no terminal), one note, Ray's and Tune's output in sweep.log
    printed = (done.stdout + done.stderr).splitlines()
    assert len(printed) <= 40, "\n".join(printed)
    assert sum("no --data-root given" in line for line in printed) == 1, "\n".join(printed)
    assert f"{trial_id} ok at step 2/2" in done.stdout, done.stdout
    assert not any(s in done.stdout + done.stderr for s in ("Trial status", "Configuration for experiment",
                                                            "Checkpoint successfully created", " pid=")), printed
    ray_log = (sweep / "sweep.log").read_bytes()[logged:].decode("utf-8", "replace")
    assert f"Ray/Tune output: {sweep / 'sweep.log'}" in done.stdout
    assert "Started a local Ray instance" in ray_log  # Ray's logger
    assert "Wrote the latest version of all result files" in ray_log  # Tune's logger
    assert "===== " in ray_log and "worker-" in ray_log  # the workers' output, appended at the end
    assert "no --data-root given" not in ray_log  # workers do not repeat the note
    steps = pq.read_table(sweep / "steps.parquet").to_pylist()
    trials = pq.read_table(sweep / "trials.parquet").to_pylist()
    assert [t["trial_id"] for t in trials] == [trial_id], trials
    assert trials[0]["status"] == "ok" and trials[0]["steps_done"] == 3
    assert sorted((r["trial_id"], r["step"]) for r in steps) == [(trial_id, s) for s in range(3)]
    after = {p.name: p.read_text() for p in step1.parent.glob("step-*.json")}
    for name in before:  # steps 0 and 1 were not run again: their rows are unchanged
        assert after[name] == before[name], f"{name} was re-run after the resume"
    assert json.loads((sweep / "sweep.json").read_text())["step0"]["trained"] == 1
