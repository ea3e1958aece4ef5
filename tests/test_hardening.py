"""Hardening: bad input of every kind ends in ONE ``error:`` line on stderr and a non-zero exit.

Every CLI command (``scenarios``, ``methods``, ``data synth``, ``train``, ``test`` and, once
``cli.py`` has them, ``sweep``, ``results``, ``export-best``, ``final``, ``spaces``) is driven
through ``typer.testing.CliRunner`` (click 8.2+: ``result.stderr`` is separate; an uncaught
exception stays in ``result.exception`` instead of being printed), and through the real
console script (one data error, and the SIGKILL test below). Informational lines a command prints before failing (``run ... -> DIR``,
``csseg: no --data-root given ...``) are allowed; anything else on stderr is not.

Also here: atomic Parquet tables survive a writer killed mid-write (every finished row reads
back, the final file is never truncated), and a sweep process killed with SIGKILL during a
step resumes from its last step checkpoint with each trial exactly once in the tables
(``tests/test_sweeper_e2e.py`` covers a restore after an interrupted cell, not a SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
from csseg_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INFO_PREFIXES = ("run ", "csseg: ")
runner = CliRunner()


# ---------------------------------------------------------------------------- helpers
def _commands() -> set[str]:
    import typer.main

    group = typer.main.get_command(cli.app)
    names = set(group.commands)
    if "data" in group.commands:
        names |= {f"data {n}" for n in group.commands["data"].commands}
    return names


COMMANDS = _commands()


def needs(command: str):
    return pytest.mark.skipif(command not in COMMANDS, reason=f"`csseg {command}` is not in cli.py yet")


def assert_user_error(result, *needles: str) -> str:
    """Non-zero exit, no uncaught exception, exactly one ``error:`` line, last on stderr."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {type(exc).__name__}: {exc}\n{result.output}"
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], f"stderr is not one error line:\n{result.stderr}"
    extra = [ln for ln in lines[:-1] if not ln.startswith(INFO_PREFIXES)]
    assert not extra, f"unexpected stderr lines: {extra}"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Private $CSSEG_HOME and CWD: nothing of a failing command lands in the repo or the user's cache."""
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def voc_template(tmp_path_factory):
    from csseg_core.data import synth

    return synth.generate(tmp_path_factory.mktemp("voc-template"), n_train=40, n_val=20, size=48)


@pytest.fixture
def voc(tmp_path, voc_template):
    """A private copy of the tiny synthetic VOC set (tests corrupt it)."""
    dst = tmp_path / "voc"
    shutil.copytree(voc_template, dst)
    return dst


def _voc2012(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _first_id(root: Path, split: str = "train") -> str:
    return (_voc2012(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]


def _train(root: Path, tmp_path: Path, *extra: str):
    return invoke("train", "voc-offline", "--data-root", root, "--out", tmp_path / "run", "--no-progress", *extra)


# ---------------------------------------------------------------------------- scenarios / methods
def test_scenarios_and_methods_succeed():
    assert invoke("scenarios").exit_code == 0
    assert invoke("methods").exit_code == 0


def test_scenarios_unknown_dataset():
    assert_user_error(invoke("scenarios", "--dataset", "coco"), "coco")


# click's own usage errors (unknown option, extra argument, missing option, value not an int)
# are printed by Typer as a multi-line rich panel ("Usage: ... ╭─ Error ─...╮"), not one line.
USAGE = [
    ("methods", "--bogus"),
    ("methods", "extra"),
    ("data", "synth"),  # missing --root
    ("train", "voc-15-1", "--seed", "abc"),
    ("data", "synth", "--root", "x", "--size", "big"),
]


@pytest.mark.parametrize("args", USAGE, ids=lambda a: " ".join(a))
def test_usage_errors_are_one_line(args):
    assert_user_error(invoke(*args))


@pytest.mark.parametrize("args", USAGE, ids=lambda a: " ".join(a))
def test_usage_errors_fail_without_traceback(args):
    result = invoke(*args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------- data synth
@pytest.mark.parametrize("args, needle", [
    (("--dataset", "coco"), "coco"),
    (("--train", "5"), "at least"),
    (("--size", "8"), "size"),
])
def test_data_synth_bad_values(tmp_path, args, needle):
    assert_user_error(invoke("data", "synth", "--root", tmp_path / "out", *args), needle)


def test_data_synth_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(invoke("data", "synth", "--root", blocker / "sub", "--train", "20", "--val", "20", "--size", "32"),
                      str(blocker))


# ---------------------------------------------------------------------------- train: config errors
@pytest.mark.parametrize("args, needle", [
    (("voc-99-1",), "unknown scenario"),
    (("voc-15-1", "--method", "nope"), "nope"),
    (("voc-15-1", "--set", "nope=1"), "unknown key"),
    (("voc-15-1", "--set", "epochs=abc"), "epochs"),
    (("voc-15-1", "--set", "kd=abc", "--method", "lwf"), "kd"),
    (("voc-15-1", "--set", "epochs"), "key=value"),
    (("voc-15-1", "--set", "epochs=0"), "epochs"),
    (("voc-15-1", "--mode", "sideways"), "sideways"),
    (("voc-15-1", "--profile", "huge"), "huge"),
    (("voc-15-1", "--step", "9"), "out of range"),
    (("voc-15-1", "--step", "2"), "step"),  # needs step 1's checkpoint
    ((), "no scenario"),
])
def test_train_config_errors(tmp_path, args, needle):
    assert_user_error(invoke("train", *args, "--out", tmp_path / "run", "--no-progress"), needle)


def test_train_config_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_user_error(invoke("train", "voc-15-1", "--config", missing, "--out", tmp_path / "r"), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    assert_user_error(invoke("train", "voc-15-1", "--config", bad, "--out", tmp_path / "r"), "not valid YAML")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    assert_user_error(invoke("train", "voc-15-1", "--config", scalar, "--out", tmp_path / "r"), "mapping")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochs: 1\nwarp_factor: 9\n")
    assert_user_error(invoke("train", "voc-15-1", "--config", unknown, "--out", tmp_path / "r"), "warp_factor")


def test_train_step_ckpt_errors(tmp_path):
    import torch

    assert_user_error(invoke("train", "voc-15-1", "--step-ckpt", tmp_path / "nope.pt", "--out", tmp_path / "r"),
                      "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(512))
    assert_user_error(invoke("train", "voc-15-1", "--step-ckpt", junk, "--out", tmp_path / "r"), "cannot be read")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert_user_error(invoke("train", "voc-15-1", "--step-ckpt", other, "--out", tmp_path / "r"), "not a csseg")


def test_train_unwritable_out(tmp_path, voc):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("train", "voc-offline", "--data-root", voc, "--out", blocker / "run", "--no-progress"),
                      "cannot write")


# ---------------------------------------------------------------------------- train: data errors
def test_train_missing_data_root(tmp_path):
    assert_user_error(_train(tmp_path / "nowhere", tmp_path), "does not exist")


def test_train_missing_list_file(tmp_path, voc):
    (_voc2012(voc) / "ImageSets" / "Segmentation" / "train.txt").unlink()
    assert_user_error(_train(voc, tmp_path), "train.txt")


def test_train_missing_image(tmp_path, voc):
    first = _first_id(voc)
    (_voc2012(voc) / "JPEGImages" / f"{first}.jpg").unlink()
    assert_user_error(_train(voc, tmp_path), f"{first}.jpg")


def test_train_corrupt_jpeg(tmp_path, voc):
    first = _first_id(voc)
    path = _voc2012(voc) / "JPEGImages" / f"{first}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    msg = assert_user_error(_train(voc, tmp_path), f"{first}.jpg")
    assert "corrupt" in msg


def test_train_garbage_jpeg(tmp_path, voc):
    first = _first_id(voc)
    (_voc2012(voc) / "JPEGImages" / f"{first}.jpg").write_bytes(b"this is not an image at all")
    assert_user_error(_train(voc, tmp_path), f"{first}.jpg")


def test_train_label_id_out_of_range(tmp_path, voc):
    first = _first_id(voc)
    path = _voc2012(voc) / "SegmentationClass" / f"{first}.png"
    arr = np.array(Image.open(path))
    arr[:4, :4] = 30  # VOC ids are 0..20 and 255
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    msg = assert_user_error(_train(voc, tmp_path), f"{first}.png")
    assert "30" in msg


def test_train_label_wrong_size(tmp_path, voc):
    first = _first_id(voc)
    path = _voc2012(voc) / "SegmentationClass" / f"{first}.png"
    im = Image.open(path)
    im.resize((im.width + 8, im.height)).save(path)
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_rgb_label(tmp_path, voc):
    first = _first_id(voc)
    path = _voc2012(voc) / "SegmentationClass" / f"{first}.png"
    Image.open(path).convert("RGB").save(path)
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_corrupt_label_png(tmp_path, voc):
    first = _first_id(voc)
    (_voc2012(voc) / "SegmentationClass" / f"{first}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_empty_step_after_filtering(tmp_path, voc):
    """A train list whose images hold no class of the step: the step is empty, one line."""
    seg = _voc2012(voc) / "SegmentationClass"
    lst = _voc2012(voc) / "ImageSets" / "Segmentation" / "train.txt"
    ids = lst.read_text().split()
    keep = [i for i in ids if not (set(np.unique(np.array(Image.open(seg / f"{i}.png")))) & set(range(1, 16)))]
    lst.write_text("\n".join(keep) + "\n")
    result = invoke("train", "voc-15-1", "--data-root", voc, "--out", tmp_path / "run", "--no-progress")
    assert_user_error(result, "empty")


# ---------------------------------------------------------------------------- test command
def _state(tmp_path: Path, **changes) -> Path:
    from csseg_core.config import resolve_config
    from csseg_core.models import build_model
    from csseg_core.state import save_state

    cfg = resolve_config("voc-15-1", "ft", overrides={"head_channels": 32})
    model = build_model(cfg.backbone, (16,), output_stride=cfg.output_stride, head_channels=cfg.head_channels)
    state = {"step": 0, "config": cfg.to_dict(), "model": model.state_dict(), "statistics": {}, "history": [0.5]}
    state.update(changes)
    return save_state({k: v for k, v in state.items() if v is not None}, tmp_path / "state.pt")


def test_test_command_errors(tmp_path):
    import torch

    assert_user_error(invoke("test", tmp_path / "nope.pt"), "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    assert_user_error(invoke("test", junk), "cannot be read")
    other = tmp_path / "other.pt"
    torch.save([1, 2, 3], other)
    assert_user_error(invoke("test", other), "not a csseg")


def test_test_command_data_errors(tmp_path, voc):
    path = _state(tmp_path)
    assert_user_error(invoke("test", path, "--data-root", tmp_path / "nowhere"), "does not exist")
    first = _first_id(voc, "val")
    label = _voc2012(voc) / "SegmentationClass" / f"{first}.png"
    arr = np.array(Image.open(label))
    arr[0, 0] = 77
    Image.fromarray(arr.astype(np.uint8), mode="L").save(label)
    assert_user_error(invoke("test", path, "--data-root", voc), f"{first}.png")


@pytest.mark.parametrize("change", ["no_config", "bad_weights"])
def test_test_command_inconsistent_state(tmp_path, voc, change):
    import torch

    path = _state(tmp_path, config=None) if change == "no_config" else _state(tmp_path, model={"x": torch.zeros(1)})
    assert_user_error(invoke("test", path, "--data-root", voc))


# ---------------------------------------------------------------------------- console script
def _csseg(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("csseg")
    cmd = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "cli.py")]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **(env or {})})


def test_console_script_prints_one_error_line(tmp_path, voc):
    first = _first_id(voc)
    path = _voc2012(voc) / "JPEGImages" / f"{first}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    proc = _csseg("train", "voc-offline", "--data-root", voc, "--out", tmp_path / "run", "--no-progress", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error:") and f"{first}.jpg" in lines[-1]
    assert all(ln.startswith(INFO_PREFIXES) for ln in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------- sweeper commands
@needs("sweep")
@pytest.mark.parametrize("args, needle", [
    (("voc-99-1",), "unknown scenario"),
    (("voc-15-1", "--method", "nope"), "nope"),
    (("voc-15-1", "--trials", "0"), "trials"),
    (("voc-15-1", "--metric", "bogus"), "bogus"),
    (("voc-15-1", "--scheduler", "bogus"), "bogus"),
    (("voc-15-1", "--mode", "sideways"), "sideways"),
    (("voc-15-1", "--workers-per-trial", "0"), "workers"),
    (("voc-15-1", "--cpus-per-worker", "0"), "cpus_per_worker"),
    (("voc-15-1", "--set", "nope=1"), "unknown key"),
    (("voc-15-1", "--set", "epochs=abc"), "epochs"),
    (("voc-15-1", "--profile", "huge"), "huge"),
    (("voc-15-1", "--name", "../escape"), "name"),
    (("voc-15-1", "--resume", "--name", "never-ran"), "nothing to resume"),
    (("voc-15-1", "--select-on", "train"), "--select-on"),
    (("voc-15-1", "--protocol", "first-task"), "first-task"),
    (("voc-15-1", "--set", "val_fraction=0"), "val_fraction=0"),
    (("voc-15-1", "--set", "val_fraction=1"), "val_fraction"),
])
def test_sweep_bad_input(tmp_path, args, needle):
    assert_user_error(invoke("sweep", *args, "--storage", tmp_path / "sweeps"), needle)


@needs("sweep")
def test_sweep_bad_seed_list(tmp_path):
    assert_user_error(invoke("sweep", "voc-15-1", "--seeds", "0,a", "--storage", tmp_path / "sweeps"), "a")


@needs("sweep")
def test_sweep_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("sweep", "voc-15-1", "--trials", "1", "--storage", blocker / "sweeps"), "not writable")


@needs("results")
def test_results_empty_or_missing_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("results", tmp_path / "empty"), "not a sweep")
    assert_user_error(invoke("results", tmp_path / "missing"))


@needs("export-best")
def test_export_best_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("export-best", tmp_path / "empty", "--out", tmp_path / "best.yaml"))
    assert_user_error(invoke("export-best", tmp_path / "empty", "--top", "3", "--seeds", "0"))
    assert not (tmp_path / "best.yaml").exists()


@needs("final")
def test_final_bad_files(tmp_path):
    assert_user_error(invoke("final", tmp_path / "missing.yaml"), "does not exist")
    other = tmp_path / "other.yaml"
    other.write_text("just: data\n")
    assert_user_error(invoke("final", other), "not a best-config file")
    assert_user_error(invoke("final", other, "--seeds", "0"), "seed")
    good = tmp_path / "good.yaml"
    good.write_text("scenario: voc-15-1\nmethod: ft\nparams: {}\n")
    assert_user_error(invoke("final", good, "--scenarios", "voc-15-9"), "voc-15-9")
    assert_user_error(invoke("final", good, "--scenarios", "ade-100-50"), "same dataset")


@needs("final")
def test_final_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells: [1, 2\n")
    assert_user_error(invoke("final", bad), "bad.yaml")


@needs("spaces")
def test_spaces_unknown_method():
    assert_user_error(invoke("spaces", "nope"), "nope")


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


# ---------------------------------------------------------------------------- atomic Parquet
def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"trial_id": f"t{i:03d}", "step": i % 3, "miou_all": i / 100, "class_iou": [0.1 * (i % 5), None],
             "status": "ok"} for i in range(start, start + n)]


def test_interrupted_parquet_write_keeps_every_finished_row(tmp_path, monkeypatch):
    import csseg_core.results as R

    path = tmp_path / "steps.parquet"
    R.append_rows(path, _rows(5), key=("trial_id",))
    R.append_rows(path, _rows(5, 5), key=("trial_id",))
    before = path.read_bytes()

    # crash between the temporary write and the rename
    def crash(*a, **k):
        raise KeyboardInterrupt("killed before os.replace")

    monkeypatch.setattr(R.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        R.append_rows(path, _rows(3, 10), key=("trial_id",))
    monkeypatch.undo()
    assert path.read_bytes() == before  # the final file is never touched by a failed write
    assert [r["trial_id"] for r in R.read_rows(path)] == [f"t{i:03d}" for i in range(10)]
    assert pq.ParquetFile(path).metadata.num_rows == 10

    # crash in the middle of writing the temporary file (half a Parquet file on disk)
    real_write = pq.write_table

    def half_write(table, where, *a, **k):
        real_write(table, where, *a, **k)
        with open(where, "r+b") as f:
            f.truncate(os.path.getsize(where) // 2)
        raise OSError("disk died mid-write")

    monkeypatch.setattr(R.pq, "write_table", half_write)
    with pytest.raises(OSError):
        R.append_rows(path, _rows(3, 10), key=("trial_id",))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "steps.parquet"], "temporary files are cleaned up"

    # a temporary file left by a killed writer (SIGKILL skips `finally`) does not disturb readers or writers
    (tmp_path / ".steps.parquet.abc123.tmp").write_bytes(before[: len(before) // 2])
    assert len(R.read_rows(path)) == 10
    R.append_rows(path, _rows(2, 10), key=("trial_id",))
    assert len(R.read_rows(path)) == 12


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


WRITER = textwrap.dedent("""
    import sys
    from csseg_core.results import append_rows, read_rows
    path = sys.argv[1]
    start = len(read_rows(path))
    print("ready", flush=True)
    for i in range(start, 100000):
        rows = [{"trial_id": f"t{i:05d}", "payload": list(range(2000)), "x": float(i)}]
        append_rows(path, rows, key=("trial_id",))
""")


def test_writer_killed_with_sigkill_never_leaves_a_truncated_table(tmp_path):
    """SIGKILL a process appending rows in a loop at random points: the final file always reads back
    whole, and holds a gap-free prefix of the rows (every finished append is there)."""
    path = tmp_path / "steps.parquet"
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                cwd=str(ROOT))
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while (not path.exists() or pq.ParquetFile(path).metadata.num_rows <= seen) and time.monotonic() < deadline:
            time.sleep(0.05)  # this writer finished at least one append
        time.sleep(float(rng.uniform(0.3, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = pq.read_table(path).to_pylist()  # never truncated: reading must not fail
        ids = [r["trial_id"] for r in rows]
        assert ids == [f"t{i:05d}" for i in range(len(ids))], "every finished append is kept, in order"
        assert len(ids) > seen
        seen = len(ids)
    assert seen > 0


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


@pytest.mark.slow
@needs("sweep")
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
            if frags and any('"step-001"' in p.read_text() for p in snaps):  # Ray Train registered the checkpoint
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
