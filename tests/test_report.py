"""``csseg report`` (sweep and run folders) and the terminal leaderboard ``csseg results``, on fake folders (no Ray)."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from report_fixtures import BEST, CELL, TEST_BEST, make_run, make_sweep, trial_params
from rich.console import Console
from typer.testing import CliRunner

import cli
from csseg_cli import common

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

SWEEP_FIGURES = ["01-miou-per-step", "02-old-vs-new", "03-parallel-coordinate", "04-param-importances", "05-history",
                 "06-class-iou"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("report") / "fake-sdr")


@pytest.fixture(scope="module")
def written(sweep):
    result = CliRunner().invoke(cli.app, ["report", str(sweep)])
    assert result.exit_code == 0, result.output
    assert f"wrote {sweep / 'report' / 'report.html'} (6 figures), 6 PNGs" in result.output
    return sweep / "report"


def _one_error_line(result, needle: str) -> None:
    assert result.exit_code not in (0, None) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


# ---------------------------------------------------------------------------- sweep report
def test_html_is_self_contained_with_one_div_per_figure(written):
    page = (written / "report.html").read_text()
    divs = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', page)
    assert divs == [f"fig-{n}" for n in SWEEP_FIGURES]
    assert page.count("Plotly.newPlot(") == 6
    assert not re.search(r"<script[^>]+src=", page)  # no external script: opens offline
    assert len(page) > 3_000_000  # plotly.js itself is inlined (once)
    assert "t04 (error)" in page and "t05 (running)" in page  # trial labels of the per-step plot


def test_pngs_are_readable_images(written):
    from PIL import Image

    pngs = sorted(p.stem for p in written.glob("*.png"))
    assert pngs == SWEEP_FIGURES
    for stem in pngs:
        path = written / f"{stem}.png"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            lo, hi = im.convert("L").getextrema()
            assert im.width >= 500 and im.height >= 250 and hi - lo > 100, (stem, im.size)
        assert path.stat().st_size > 10_000, stem


def test_report_md_names_the_best_configuration_and_its_command(written):
    md = (written / "report.md").read_text()
    best = trial_params(int(BEST[1:]))
    assert f"Best trial `{BEST}`: val_miou_all = 80.0 %" in md and TEST_BEST not in md.split("Best trial")[1][:40]
    for name, value in best.items():
        assert f"| {name} | {value} |" in md
        assert f"--set {name}={value}" in md
    assert "csseg train voc-15-5 --method sdr --mode disjoint --profile smoke --seed 0 " in md
    assert "- trials: 6 (1 error, 4 ok, 1 running)" in md and "6 trial(s), 4 finished every step, 1 failed." in md
    assert "wall time 2.1 min" in md and "step 0 trained 1 time(s), reused 5 time(s)" in md
    assert "failure t04: TrainingError: loss is NaN" in md


def test_importances_need_two_finished_trials(tmp_path):
    sweep = make_sweep(tmp_path / "one", finished=1)
    from sweeper.report import report

    out = report(sweep, tmp_path / "out")
    names = [p.stem for p in out["pngs"]]
    assert names == ["01-miou-per-step", "02-old-vs-new", "03-history", "04-class-iou"], names
    page = out["html"].read_text()
    assert "1 finished Optuna trial(s): parallel coordinates and importances need 2" in page
    assert page.count('class="plotly-graph-div"') == 4


def test_final_table_when_final_runs_exist(tmp_path):
    from csseg_core.results import append_rows
    from sweeper.report import report

    sweep = make_sweep(tmp_path / "s", finished=2)
    row = {"cell": CELL, "tuned_on": "voc-15-5", "scenario": "voc-15-5", "transfer": False, "seeds": [0, 1, 2]}
    row.update({f"{k}_mean": 0.5 for k in ("val_miou_all", "val_miou_old", "val_miou_new", "val_miou_avg",
                                             "miou_all", "miou_old", "miou_new", "miou_avg")})
    row.update({f"{k}_std": 0.02 for k in ("val_miou_all", "val_miou_old", "val_miou_new", "val_miou_avg",
                                            "miou_all", "miou_old", "miou_new", "miou_avg")})
    append_rows(sweep / "final" / "final.parquet", [row, {**row, "cell": "voc-19-1-disjoint", "tuned_on": "voc-19-1"}])
    out = report(sweep, tmp_path / "out")
    assert "<td>50.0 ± 2.0</td>" in out["html"].read_text() and "voc-19-1" not in out["md"].read_text()
    assert "| voc-15-5 | voc-15-5 | 3 | test | 50.0 ± 2.0 |" in out["md"].read_text()
    elsewhere = tmp_path / "best" / "final.parquet"  # csseg final best.yaml writes next to best.yaml
    (sweep / "final" / "final.parquet").rename(elsewhere.parent.mkdir() or elsewhere)
    assert "50.0 ± 2.0" not in report(sweep, tmp_path / "out2")["md"].read_text()
    result = CliRunner().invoke(cli.app, ["report", str(sweep), "--out", str(tmp_path / "out3"), "--final", str(elsewhere)])
    assert result.exit_code == 0 and "50.0 ± 2.0" in (tmp_path / "out3" / "report.md").read_text()
    _one_error_line(CliRunner().invoke(cli.app, ["report", str(sweep), "--final", str(tmp_path / "no.parquet")]),
                    "does not exist")


# ---------------------------------------------------------------------------- run folder (csseg train)
def test_run_folder_report_plots_steps_and_classes(tmp_path):
    run = make_run(tmp_path / "voc-15-1-disjoint-ft-abc", steps=3)
    result = CliRunner().invoke(cli.app, ["report", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["01-miou-per-step.png", "02-class-iou.png"]
    assert (out / "report.html").read_text().count('class="plotly-graph-div"') == 2
    md = (out / "report.md").read_text()
    assert "| voc-15-1-disjoint-ft-abc | 2 | 52.0 | 51.0 | 25.0 | 50.0 | 48.0 | 20.0 |" in md


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_folder_is_one_error_line(case, tmp_path):
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    result = CliRunner().invoke(cli.app, ["report", str(folder)])
    _one_error_line(result, "does not exist" if case == "missing" else "neither a sweep folder")


def test_missing_plotting_library_names_the_extra(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", steps=1)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    _one_error_line(CliRunner().invoke(cli.app, ["report", str(run)]), "pip install -e '.[report]'")


# ---------------------------------------------------------------------------- leaderboard
@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(common, "console", Console(width=100, file=io.StringIO()))
    return common.console


def test_leaderboard_fits_100_columns_one_line_per_trial(sweep, narrow):
    result = CliRunner().invoke(cli.app, ["results", str(sweep)])
    assert result.exit_code == 0, result.output
    text = narrow.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100, text
    for trial_id in ("t00", "t01", "t02", "t03"):
        assert sum(trial_id in line for line in text.splitlines()) == 1, text
    assert "t04" not in text and "t05" not in text  # failed and running trials are not ranked
    best = next(line for line in text.splitlines() if BEST in line)
    assert best.split()[:5] == ["1*", BEST, "80.0", "80.0", "40.0"], best  # rank, trial, val all/old/new in %
    assert "sparsity_norm" not in text.splitlines()[2] and "s_norm" in text  # short headers, legend in the caption
    assert "s_norm=sparsity_norm" in text
    kd = trial_params(2)["kd"]
    assert f" {float(f'{kd:.3g}'):g} " in best or f" {kd:.3g} " in best


def test_leaderboard_wide_shows_every_column(sweep, narrow):
    text = CliRunner().invoke(cli.app, ["results", str(sweep), "--wide"]).stdout  # its own console, natural width
    header = " ".join(text.splitlines()[2].split())
    assert header.startswith("# trial seed all old new avg all old new avg attraction kd pm repulsion"), header
    assert trial_params(0)["sparsity_norm"] in text and "…" not in text  # "max_maskedforclass", nothing cut
    assert sum("t00" in line for line in text.splitlines()) == 1


def test_leaderboard_formats_parse(sweep):
    pd = pytest.importorskip("pandas")
    runner = CliRunner()
    csv_out = runner.invoke(cli.app, ["results", str(sweep), "--format", "csv"])
    assert csv_out.exit_code == 0, csv_out.output
    frame = pd.read_csv(io.StringIO(csv_out.stdout))
    assert list(frame["trial_id"]) == ["t02", "t03", "t01", "t00"] and frame["val_miou_all"].max() == pytest.approx(0.8)
    assert {"kd", "sparsity_norm", "miou_all", "pareto"} <= set(frame.columns)
    rows = json.loads(runner.invoke(cli.app, ["results", str(sweep), "--format", "json"]).stdout)
    assert [r["trial_id"] for r in rows] == ["t02", "t03", "t01", "t00"] and rows[0]["kd"] == trial_params(2)["kd"]
    md = runner.invoke(cli.app, ["results", str(sweep), "--format", "md"]).stdout.splitlines()
    assert md[0].startswith("| cell | rank | trial | val all |") and len(md) == 2 + 4
    assert md[2].startswith(f"| {CELL} | 1* | t02 | 80.0 | 80.0 | 40.0 | 70.0 |")
    _one_error_line(runner.invoke(cli.app, ["results", str(sweep), "--format", "xml"]), "unknown --format")


# ---------------------------------------------------------------------------- dashboard
def test_dashboard_serves_the_journal_on_localhost(sweep, monkeypatch):
    import types

    from optuna.storages import JournalStorage

    calls = []
    fake = types.ModuleType("optuna_dashboard")
    fake.run_server = lambda storage, host, port: calls.append((storage, host, port))
    monkeypatch.setitem(sys.modules, "optuna_dashboard", fake)
    result = CliRunner().invoke(cli.app, ["dashboard", str(sweep), "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8123/" in result.output
    [(storage, host, port)] = calls
    assert isinstance(storage, JournalStorage) and host == "127.0.0.1" and port == 8123
    [study] = storage.get_all_studies()
    assert study.study_name == CELL


def test_dashboard_errors_are_one_line(sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    _one_error_line(CliRunner().invoke(cli.app, ["dashboard", str(sweep)]), "pip install -e '.[dashboard]'")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"name": "s", "identity": {}}))
    _one_error_line(CliRunner().invoke(cli.app, ["dashboard", str(tmp_path / "s")]), "no Optuna journal")
    _one_error_line(CliRunner().invoke(cli.app, ["dashboard", str(sweep), "--cell", "voc-1-1"]), "no study for cell")
