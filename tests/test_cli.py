"""The Typer CLI: listings, one end-to-end ``csseg train`` of voc-15-1, ``csseg test``,
``--step-ckpt``, ``--config`` and one-line errors for bad input."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import cli
from csseg_cli.runs import build_config
from csseg_core.methods import list_methods
from csseg_core.metrics import format_percent as _pct
from csseg_core.results import read_rows
from csseg_core.scenarios import get_scenario
from csseg_core.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE_SET = ["--set", "epochs=1", "--set", "epochs_incremental=1", "--set", "crop_size=64", "--set", "head_channels=32"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the body rows of rich tables (lines between │ ... │)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def _run_name(stderr: str) -> str:
    m = re.search(r"^run (\S+) -> ", stderr, re.M)
    assert m, stderr
    return m.group(1)


@pytest.fixture(scope="module")
def e2e(runner, voc_root, tmp_path_factory):
    """``csseg train voc-15-1 --method ft --profile smoke`` (one epoch per step) through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "voc-15-1", "--method", "ft", "--profile", "smoke", "--data-root", str(voc_root), *SMOKE_SET,
            "--out", str(out)]
    result = runner.invoke(cli.app, args)
    return result, out


# ----------------------------------------------------------------------------- listings
def test_methods_lists_every_registered_method(runner):
    result = runner.invoke(cli.app, ["methods"])
    assert result.exit_code == 0, result.output
    first_column = [row[0] for row in _table_rows(result.stdout) if row and row[0]]
    assert first_column == list_methods()
    assert "kd=100.0" in result.stdout and "reg=1000.0" in result.stdout


def test_scenarios_lists_voc_and_ade(runner):
    result = runner.invoke(cli.app, ["scenarios"])
    assert result.exit_code == 0, result.output
    names = {row[0] for row in _table_rows(result.stdout)}
    assert {"voc-15-1", "voc-15-5", "ade-100-50"} <= names
    row = next(r for r in _table_rows(result.stdout) if r[0] == "voc-15-1")
    assert row[1:4] == ["voc", "6", "16, 1, 1, 1, 1, 1"] and "voc-15-5s" in row[4]
    voc_only = runner.invoke(cli.app, ["scenarios", "--dataset", "voc"])
    assert "ade-100-50" not in voc_only.stdout and "voc-15-1" in voc_only.stdout


# ----------------------------------------------------------------------------- train end to end
def test_train_end_to_end_writes_six_rows(e2e):
    result, out = e2e
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = read_rows(out / "steps.parquet")
    assert [row["step"] for row in rows] == list(range(6))
    assert {row["method"] for row in rows} == {"ft"} and {row["scenario"] for row in rows} == {"voc-15-1"}
    assert sorted(p.name.split("-")[0] for p in (out / "checkpoints").glob("*.pt")) == [f"step{k}" for k in range(6)]
    assert f"results: {out / 'steps.parquet'}" in result.stdout
    # miou_avg is the running mean of miou_all
    for k, row in enumerate(rows):
        so_far = [r["miou_all"] for r in rows[: k + 1] if r["miou_all"] is not None]
        assert row["miou_avg"] == pytest.approx(np.mean(so_far), abs=1e-9)
    assert [len(row["class_iou"]) for row in rows] == [16, 17, 18, 19, 20, 21]
    assert all(row["loss_ce"] is not None and math.isfinite(row["loss_ce"]) for row in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1


def test_report_of_a_train_run_plots_its_steps(runner, e2e, tmp_path):
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    _, out = e2e
    result = runner.invoke(cli.app, ["report", str(out), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["01-miou-per-step.png", "02-class-iou.png"]
    page = (tmp_path / "report.html").read_text()
    assert page.count('class="plotly-graph-div"') == 2 and "tvmonitor" in page  # class names of voc-15-1's last step
    rows = read_rows(out / "steps.parquet")
    md = (tmp_path / "report.md").read_text()
    assert f"| {out.name} | 5 | {_pct(rows[5]['val_miou_all'])} | {_pct(rows[5]['val_miou_old'])} |" in md


def test_test_command_prints_the_miou_table(runner, e2e):
    _, out = e2e
    ckpt = next((out / "checkpoints").glob("step5-*.pt"))
    row = read_rows(out / "steps.parquet")[5]
    result = runner.invoke(cli.app, ["test", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert f"{ckpt.name}: step 5 test" in result.stdout.replace("\n", "")
    rows = _table_rows(result.stdout)
    assert rows[0][:3] == [_pct(row["miou_all"]), _pct(row["miou_old"]), _pct(row["miou_new"])]
    per_class = rows[1:]
    names = list(get_scenario("voc-15-1").class_names())[:21]
    assert [r[0] for r in per_class] == names
    assert [r[1] for r in per_class] == [_pct(x) for x in row["class_iou"]]
    val = runner.invoke(cli.app, ["test", str(ckpt), "--split", "val"])  # the held-out split the run recorded
    assert val.exit_code == 0, val.output
    assert _table_rows(val.stdout)[0][:3] == [_pct(row["val_miou_all"]), _pct(row["val_miou_old"]),
                                              _pct(row["val_miou_new"])]
    assert runner.invoke(cli.app, ["test", str(ckpt), "--split", "train"]).exit_code != 0


def test_background_shift_reports_each_steps_teacher_on_the_classes_it_adds(runner, e2e):
    """``csseg background-shift``: per class added after step 0, what the model before its step predicted
    and the share of its pixels where 1 + w q_bg > w max q_old (w = kd / old classes), beside its final IoU."""
    import torch

    from csseg_core.config import ExperimentConfig
    from csseg_core.data import build_datasets
    from csseg_core.evaluation import background_shift
    from csseg_core.models import build_model, load_previous

    _, out = e2e
    final = read_rows(out / "steps.parquet")[5]["class_iou"]
    ft = background_shift(out)  # FT has no kd: w = 0, every pixel learnable
    assert [(r["class"], r["step"], r["name"]) for r in ft] == [
        (16, 1, "pottedplant"), (17, 2, "sheep"), (18, 3, "sofa"), (19, 4, "train"), (20, 5, "tvmonitor")]
    assert all(r["learnable"] == 1.0 for r in ft)
    assert [r["final_iou"] for r in ft] == pytest.approx(final[16:])
    assert all(0 <= r["called_bg"] <= 1 and 0 <= r["top_share"] <= 1 - r["called_bg"] + 1e-9 for r in ft)
    strict, mid = background_shift(out, kd=1e9), background_shift(out, kd=48.0)
    for s, m in zip(strict, mid):  # w -> inf: learnable iff the teacher's background beats every old class
        assert s["learnable"] == pytest.approx(s["called_bg"], abs=1e-3)
        assert s["learnable"] <= m["learnable"] <= 1.0

    # pottedplant at kd 48 (w = 3), counted independently pixel by pixel with the step-0 model
    cfg = ExperimentConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    teacher = build_model(cfg.backbone, (16,), pretrained=None, **cfg.model_kwargs())
    load_previous(teacher, load_state(next((out / "checkpoints").glob("step0-*.pt")))["model"])
    teacher.eval()
    test = build_datasets("voc", cfg.data_root, get_scenario("voc-15-1"), "disjoint", 5, crop_size=cfg.crop_size,
                          splits=("test",), val_fraction=cfg.val_fraction)["test"]
    wins = total = 0
    with torch.no_grad():
        for i in range(len(test)):
            image, label = test[i]
            if not (label == 16).any():
                continue
            q = torch.softmax(teacher(image[None])[0][0], 0)[:, label == 16]
            wins += int((1 + 3 * q[0] > 3 * q[1:].max(0).values).sum())
            total += int((label == 16).sum())
    assert total > 0 and mid[0]["learnable"] == pytest.approx(wins / total, abs=1e-6)

    result = runner.invoke(cli.app, ["background-shift", str(out), "--kd", "48"])
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.stdout)
    assert [r[:2] for r in rows] == [["pottedplant", "1"], ["sheep", "2"], ["sofa", "3"], ["train", "4"],
                                     ["tvmonitor", "5"]]
    assert [r[5] for r in rows] == [_pct(m["learnable"]) for m in mid] and rows[0][6] == _pct(final[16])
    bad = runner.invoke(cli.app, ["background-shift", str(out), "--kd", "-1"])
    assert bad.exit_code != 0 and "kd -1.0 is not a weight" in bad.output
    no_run = runner.invoke(cli.app, ["background-shift", str(out.parent)])  # no config.yaml there
    assert no_run.exit_code != 0 and "config.yaml does not exist" in no_run.output


def test_step_ckpt_starts_from_the_given_state(runner, e2e, voc_root, tmp_path):
    _, out = e2e
    step0 = next((out / "checkpoints").glob("step0-*.pt"))
    target = tmp_path / "from-step0"
    result = runner.invoke(cli.app, ["train", "voc-15-1", "--method", "lwf", "--data-root", str(voc_root), *SMOKE_SET,
                                     "--step-ckpt", str(step0), "--step", "1", "--out", str(target), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "step 0" not in result.stdout
    rows = read_rows(target / "steps.parquet")
    assert [(r["step"], r["method"]) for r in rows] == [(1, "lwf")]
    assert [p.name.split("-")[0] for p in (target / "checkpoints").glob("*.pt")] == ["step1"]
    state = load_state(next((target / "checkpoints").glob("step1-*.pt")))
    assert state["history"][0] == load_state(step0)["history"][0]  # carried over from the given state
    assert rows[0]["loss_kd"] is not None and math.isfinite(rows[0]["loss_kd"])


def test_config_file_reproduces_the_run_name_and_resumes(runner, e2e):
    result, out = e2e
    again = runner.invoke(cli.app, ["train", "--config", str(out / "config.yaml"), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert _run_name(again.stderr) == _run_name(result.stderr)
    assert _run_name(result.stderr).startswith("voc-15-1-disjoint-ft-")
    assert again.stdout.count(": reusing ") == 6
    assert [row["step"] for row in read_rows(out / "steps.parquet")] == list(range(6))


def test_config_file_is_below_set_and_explicit_options(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"scenario": "voc-15-5", "method": "sdr", "seed": 3, "epochs": 5, "params": {"kd": 3.0}}))
    cfg = build_config(None, None, None, None, None, None, ["epochs=2"], path)
    assert (cfg.scenario, cfg.method, cfg.seed, cfg.epochs, cfg.method_params["kd"]) == ("voc-15-5", "sdr", 3, 2, 3.0)
    cfg = build_config("voc-15-1", None, None, "overlapped", 9, None, [], path)
    assert (cfg.scenario, cfg.mode, cfg.seed, cfg.method) == ("voc-15-1", "overlapped", 9, "sdr")


# ----------------------------------------------------------------------------- bad input
def _bad_inputs(voc_root: Path, tmp: Path):
    blocker = tmp / "a-file"
    blocker.write_text("x")
    return {
        "unknown scenario": (["train", "voc-15-x"], "unknown scenario 'voc-15-x'"),
        "unknown method": (["train", "voc-15-1", "--method", "sdrr"], "unknown method 'sdrr'"),
        "unknown key": (["train", "voc-15-1", "--set", "nokey=1"], "unknown key 'nokey'"),
        "bad int": (["train", "voc-15-1", "--set", "epochs=abc"], "epochs='abc'"),
        "bad float": (["train", "voc-15-1", "--method", "sdr", "--set", "kd=x"], "kd='x'"),
        "bad reference switch": (["train", "voc-15-1", "--method", "sdr", "--set", "sdr_feature_gather=channels"],
                                 "sdr_feature_gather must be one of pixel, reference (got 'channels')"),
        "not key=value": (["train", "voc-15-1", "--set", "epochs"], "key=value"),
        "step out of range": (["train", "voc-15-1", "--step", "9", "--out", str(tmp / "o1")], "--step 9 is out of range"),
        "step without its previous checkpoint": (["train", "voc-15-1", "--step", "2", "--out", str(tmp / "o3"),
                                                  "--data-root", str(voc_root), *SMOKE_SET], "step1-"),
        "missing data root": (["train", "voc-15-1", "--data-root", str(tmp / "missing"), "--out", str(tmp / "o2"),
                               "--no-progress", *SMOKE_SET], str(tmp / "missing")),
        "unwritable out": (["train", "voc-15-1", "--data-root", str(voc_root), "--out", str(blocker / "run"),
                            "--no-progress", *SMOKE_SET], "cannot write to output directory"),
        "missing config": (["train", "--config", str(tmp / "nope.yaml")], "nope.yaml does not exist"),
        "missing checkpoint": (["test", str(tmp / "nope.pt")], "nope.pt does not exist"),
        "foreign checkpoint": (["test", str(blocker)], "cannot be read"),
        "missing step ckpt": (["train", "voc-15-1", "--step-ckpt", str(tmp / "none.pt")], "none.pt does not exist"),
    }


CASES = ["unknown scenario", "unknown method", "unknown key", "bad int", "bad float", "bad reference switch", "not key=value",
         "step out of range",
         "step without its previous checkpoint",
         "missing data root", "unwritable out", "missing config", "missing checkpoint", "missing step ckpt",
         "foreign checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_error_line_and_no_traceback(case, runner, voc_root, tmp_path):
    args, needle = _bad_inputs(Path(voc_root), tmp_path)[case]
    result = runner.invoke(cli.app, args)
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no uncaught exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert needle in errors[0]
    assert "error" not in result.stdout.lower()


def test_console_script_reports_bad_input_on_one_line():
    exe = Path(sys.executable).parent / "csseg"
    if not exe.exists():
        pytest.skip("the csseg console script is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "train", "voc-15-x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: unknown scenario")
    assert "Traceback" not in proc.stderr + proc.stdout
