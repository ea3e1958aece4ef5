"""Hardening of ``cli.py``: bad input of every kind ends in ONE ``error:`` line on stderr and a non-zero exit.

Every CLI command (``scenarios``, ``methods``, ``data synth``, ``train``, ``test``, ``sweep``,
``results``, ``export-best``, ``final``, ``spaces``) is driven through ``typer.testing.CliRunner``
(click 8.2+: ``result.stderr`` is separate; an uncaught exception stays in ``result.exception``
instead of being printed), and through the real console script (one data error). Informational
lines a command prints before failing (``run ... -> DIR``, ``csseg: no --data-root given ...``) are
allowed; anything else on stderr is not. The data errors are raised by ``csseg_core.data``; what is
checked here is that the CLI turns each into one line naming the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hardening_fixtures import (  # noqa: F401  (fixtures)
    INFO_PREFIXES,
    ROOT,
    assert_user_error,
    first_id,
    invoke,
    isolated_fixture,
    voc2012,
    voc_fixture,
    voc_template_fixture,
)
from PIL import Image

pytestmark = pytest.mark.usefixtures("isolated")


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
    (("--clutter", "11"), "clutter"),
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
    (voc2012(voc) / "ImageSets" / "Segmentation" / "train.txt").unlink()
    assert_user_error(_train(voc, tmp_path), "train.txt")


def test_train_missing_image(tmp_path, voc):
    first = first_id(voc)
    (voc2012(voc) / "JPEGImages" / f"{first}.jpg").unlink()
    assert_user_error(_train(voc, tmp_path), f"{first}.jpg")


def test_train_corrupt_jpeg(tmp_path, voc):
    first = first_id(voc)
    path = voc2012(voc) / "JPEGImages" / f"{first}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    msg = assert_user_error(_train(voc, tmp_path), f"{first}.jpg")
    assert "corrupt" in msg


def test_train_garbage_jpeg(tmp_path, voc):
    first = first_id(voc)
    (voc2012(voc) / "JPEGImages" / f"{first}.jpg").write_bytes(b"this is not an image at all")
    assert_user_error(_train(voc, tmp_path), f"{first}.jpg")


def test_train_label_id_out_of_range(tmp_path, voc):
    first = first_id(voc)
    path = voc2012(voc) / "SegmentationClass" / f"{first}.png"
    arr = np.array(Image.open(path))
    arr[:4, :4] = 30  # VOC ids are 0..20 and 255
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    msg = assert_user_error(_train(voc, tmp_path), f"{first}.png")
    assert "30" in msg


def test_train_label_wrong_size(tmp_path, voc):
    first = first_id(voc)
    path = voc2012(voc) / "SegmentationClass" / f"{first}.png"
    im = Image.open(path)
    im.resize((im.width + 8, im.height)).save(path)
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_rgb_label(tmp_path, voc):
    first = first_id(voc)
    path = voc2012(voc) / "SegmentationClass" / f"{first}.png"
    Image.open(path).convert("RGB").save(path)
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_corrupt_label_png(tmp_path, voc):
    first = first_id(voc)
    (voc2012(voc) / "SegmentationClass" / f"{first}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_user_error(_train(voc, tmp_path), f"{first}.png")


def test_train_empty_step_after_filtering(tmp_path, voc):
    """A train list whose images hold no class of the step: the step is empty, one line."""
    seg = voc2012(voc) / "SegmentationClass"
    lst = voc2012(voc) / "ImageSets" / "Segmentation" / "train.txt"
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
    first = first_id(voc, "val")
    label = voc2012(voc) / "SegmentationClass" / f"{first}.png"
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
    first = first_id(voc)
    path = voc2012(voc) / "JPEGImages" / f"{first}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    proc = _csseg("train", "voc-offline", "--data-root", voc, "--out", tmp_path / "run", "--no-progress", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error:") and f"{first}.jpg" in lines[-1]
    assert all(ln.startswith(INFO_PREFIXES) for ln in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------- sweeper commands
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


def test_sweep_bad_seed_list(tmp_path):
    assert_user_error(invoke("sweep", "voc-15-1", "--seeds", "0,a", "--storage", tmp_path / "sweeps"), "a")


def test_sweep_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("sweep", "voc-15-1", "--trials", "1", "--storage", blocker / "sweeps"), "not writable")


def test_results_empty_or_missing_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("results", tmp_path / "empty"), "not a sweep")
    assert_user_error(invoke("results", tmp_path / "missing"))


def test_export_best_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("export-best", tmp_path / "empty", "--out", tmp_path / "best.yaml"))
    assert_user_error(invoke("export-best", tmp_path / "empty", "--top", "3", "--seeds", "0"))
    assert not (tmp_path / "best.yaml").exists()


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


def test_final_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells: [1, 2\n")
    assert_user_error(invoke("final", bad), "bad.yaml")


def test_spaces_unknown_method():
    assert_user_error(invoke("spaces", "nope"), "nope")



def test_sweep_dead_address_fails_fast(tmp_path):
    """Nothing listens at --address: one error line from a TCP probe (Ray's own join retries for minutes),
    before the sweep folder exists and without starting or joining Ray."""
    import socket

    import ray

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    line = assert_user_error(invoke("sweep", "voc-15-1", "--trials", "1", "--storage", tmp_path / "sweeps",
                                    "--name", "dead", "--address", f"127.0.0.1:{port}"), "no Ray cluster listens", str(port))
    assert "--address" in line and not (tmp_path / "sweeps" / "dead").exists()
    assert not ray.is_initialized()


def test_sweep_malformed_address(tmp_path):
    assert_user_error(invoke("sweep", "voc-15-1", "--storage", tmp_path / "sweeps", "--address", "head-node"), "HOST:PORT")
