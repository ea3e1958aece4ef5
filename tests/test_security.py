"""Security defaults: nothing csseg reads can run code, and the dashboard stays on localhost.

* the Ray dashboard: ``sweeper.ray_session.init_ray`` (what ``csseg sweep`` calls) asks for
  ``dashboard_host="127.0.0.1"`` when it starts Ray itself (tested on the kwargs it passes to a
  stand-in ``ray.init``: no dashboard is started here);
* checkpoints load with ``torch.load(weights_only=True)`` only: a pickle whose ``__reduce__``
  would write a marker file raises ``ConfigError`` from ``load_state`` (and ``csseg test`` /
  ``--step-ckpt`` print one error line) and the marker never appears; every ``torch.load``,
  ``np.load`` and YAML read in the code base is checked statically too;
* config files never execute code: ``yaml.safe_load`` refuses ``!!python/object/apply``
  (``csseg_cli.runs.load_config_file`` -> ``ConfigError``; ``sweeper.load_best`` refuses it as well);
* results are Parquet (data only, no pickled pandas metadata), index lists are read with
  ``allow_pickle=False``.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import cli
from csseg_cli.runs import load_config_file
from csseg_core.errors import ConfigError, CssegError, DataError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("csseg_cli", "csseg_core", "sweeper", "search_spaces") for p in (ROOT / d).rglob("*.py")) + [ROOT / "cli.py"]


# ---------------------------------------------------------------------------- payloads
class Evil:
    """Unpickling this writes ``marker`` (a stand-in for any code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_checkpoints(tmp_path: Path) -> list[Path]:
    marker = tmp_path / "marker"
    zip_pt = tmp_path / "evil_zip.pt"
    torch.save({"step": 0, "model": {}, "config": Evil(marker)}, zip_pt)  # torch's zip format
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"step": 0, "model": Evil(marker)}))  # a raw pickle named .pt
    return [zip_pt, legacy]


def _yaml_payloads(marker: Path) -> list[str]:
    return [
        f'!!python/object/apply:os.system ["touch {marker}"]\n',
        f"epochs: !!python/object/apply:os.system ['touch {marker}']\n",
        f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    ]


# ---------------------------------------------------------------------------- dashboard
class _FakeCtx:
    dashboard_url = "127.0.0.1:8265"


@pytest.fixture
def fake_ray(monkeypatch):
    """``sweeper.ray_session``'s ``ray.init`` / ``ray.is_initialized`` replaced by recorders."""
    session = pytest.importorskip("sweeper.ray_session")
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        return _FakeCtx()

    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", init)
    return session, calls


def test_local_ray_binds_the_dashboard_to_localhost(fake_ray, capsys):
    session, calls = fake_ray
    from sweeper import SweepSpec

    started, url = session.init_ray(SweepSpec(scenarios=("voc-15-1",)))
    assert started is True and url is not None and url.startswith("http://127.0.0.1")
    assert len(calls) == 1
    kw = calls[0]
    assert kw.get("dashboard_host") == "127.0.0.1", kw
    assert "address" not in kw or kw["address"] in (None, "local")
    assert "127.0.0.1" in capsys.readouterr().out  # the URL printed is the loopback one


def test_dashboard_can_be_turned_off_and_never_goes_public(fake_ray):
    session, calls = fake_ray
    from sweeper import SweepSpec

    session.init_ray(SweepSpec(scenarios=("voc-15-1",), dashboard=False))
    kw = calls[-1]
    assert kw.get("include_dashboard") is False
    assert kw.get("dashboard_host", "127.0.0.1") in ("127.0.0.1", "localhost")


def test_fallback_without_dashboard_packages_starts_no_dashboard(monkeypatch):
    session = pytest.importorskip("sweeper.ray_session")
    from sweeper import SweepSpec

    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("include_dashboard"):
            raise RuntimeError("Cannot include dashboard with missing packages")
        return _FakeCtx()

    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", init)
    session.init_ray(SweepSpec(scenarios=("voc-15-1",)))
    assert calls[0].get("dashboard_host") == "127.0.0.1" and calls[-1]["include_dashboard"] is False
    assert not any(c.get("dashboard_host") not in (None, "127.0.0.1") for c in calls)


def test_joining_a_cluster_does_not_override_its_dashboard(fake_ray):
    session, calls = fake_ray
    from sweeper import SweepSpec

    session.init_ray(SweepSpec(scenarios=("voc-15-1",), address="auto"))
    kw = calls[-1]
    assert kw["address"] == "auto" and "dashboard_host" not in kw and "include_dashboard" not in kw


def test_no_code_binds_anything_to_all_interfaces():
    for path in SOURCES:
        text = path.read_text()
        assert "0.0.0.0" not in text, f"{path.relative_to(ROOT)} mentions 0.0.0.0"


# ---------------------------------------------------------------------------- checkpoints
def test_the_payload_is_live(tmp_path):
    """Control: without ``weights_only`` the same file does run code (so the tests below mean something)."""
    zip_pt = _evil_checkpoints(tmp_path)[0]
    torch.load(zip_pt, weights_only=False)
    assert (tmp_path / "marker").read_text() == "pwned"


def test_load_state_refuses_pickled_code(tmp_path):
    from csseg_core.state import load_state

    for path in _evil_checkpoints(tmp_path):
        with pytest.raises(ConfigError, match="cannot be read"):
            load_state(path)
    assert not (tmp_path / "marker").exists(), "a checkpoint executed code"


def test_cli_refuses_pickled_code_in_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    for path in _evil_checkpoints(tmp_path):
        for args in (["test", str(path)], ["train", "voc-15-1", "--step-ckpt", str(path), "--out", str(tmp_path / "r")]):
            result = runner.invoke(cli.app, args)
            assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
            assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "marker").exists()


def test_sweep_step0_cache_loads_states_safely(tmp_path):
    """The cache actor reloads step-0 states from the sweep folder with ``load_state``."""
    cache = pytest.importorskip("sweeper.step0_cache")
    root = tmp_path / "step0"
    root.mkdir()
    evil = _evil_checkpoints(tmp_path)[0]
    (root / "k.pt").write_bytes(evil.read_bytes())
    (root / "k.json").write_text('{"key": "k", "metrics": {}}')
    body = cache.Step0Cache(str(root))
    with pytest.raises(CssegError):
        body._load("k")
    assert not (tmp_path / "marker").exists()


def test_a_real_state_still_round_trips(tmp_path):
    from csseg_core.state import load_state, save_state

    state = {"step": 1, "config": {"scenario": "voc-15-1"}, "model": {"w": torch.arange(4.0)},
             "statistics": {"prototypes": torch.zeros(2, 3)}, "history": [0.5, 0.4]}
    back = load_state(save_state(state, tmp_path / "s.pt"))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["history"] == [0.5, 0.4]


class _Calls(ast.NodeVisitor):
    def __init__(self) -> None:
        self.calls: list[ast.Call] = []

    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append(node)
        self.generic_visit(node)


_PARSED: dict[Path, list[ast.Call]] = {}


def _calls(name: str):
    """(file, call) for every call whose dotted name ends with ``name`` in the package sources."""
    for path in SOURCES:
        if path not in _PARSED:
            visitor = _Calls()
            visitor.visit(ast.parse(path.read_text()))
            _PARSED[path] = visitor.calls
        for call in _PARSED[path]:
            if ast.unparse(call.func).endswith(name):
                yield path, call


def _kw(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key:
            return ast.unparse(kw.value)
    return None


def test_every_torch_load_is_weights_only():
    found = list(_calls("torch.load"))
    assert found, "expected torch.load calls (csseg_core.state.load_state)"
    for path, call in found:
        assert _kw(call, "weights_only") == "True", f"{path.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True"


def test_no_pickle_or_unsafe_yaml_or_eval_in_the_code_base():
    for path in SOURCES:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        assert not re.search(r"^\s*import (pickle|dill|cloudpickle|marshal|shelve)\b", text, re.M), rel
        assert not re.search(r"\byaml\.(load|unsafe_load|full_load|load_all)\(", text), rel
        assert "yaml.Loader" not in text and "UnsafeLoader" not in text, rel
    for name in ("eval", "exec"):
        bad = [f"{p.relative_to(ROOT)}:{c.lineno}" for p, c in _calls(name) if ast.unparse(c.func) == name]
        assert not bad, f"{name}() in {bad}"
    for path, call in _calls("np.load"):
        assert _kw(call, "allow_pickle") in (None, "False"), f"{path.relative_to(ROOT)}:{call.lineno}"


# ---------------------------------------------------------------------------- config files
def test_config_file_never_executes_code(tmp_path):
    marker = tmp_path / "marker"
    for i, text in enumerate(_yaml_payloads(marker)):
        path = tmp_path / f"evil{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_config_file(path, None, None)
    assert not marker.exists()


def test_cli_train_config_payload_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(_yaml_payloads(marker)[0])
    result = CliRunner().invoke(cli.app, ["train", "voc-15-1", "--config", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip().startswith("error:") and "YAML" in result.stderr
    assert not marker.exists()


def test_best_config_file_never_executes_code(tmp_path):
    import yaml

    from sweeper import load_best

    marker = tmp_path / "marker"
    for i, text in enumerate(_yaml_payloads(marker)):
        path = tmp_path / f"best{i}.yaml"
        path.write_text(text)
        with pytest.raises((ConfigError, yaml.YAMLError)):  # must refuse; see test_hardening_sweeper for the error type
            load_best(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- data files
def test_results_are_plain_parquet(tmp_path):
    from csseg_core.results import append_rows, read_rows

    path = append_rows(tmp_path / "steps.parquet", [{"trial_id": "a", "step": 0, "class_iou": [0.5, None],
                                                     "param_kd": 10.0}])
    raw = path.read_bytes()
    assert raw[:4] == b"PAR1" and raw[-4:] == b"PAR1"
    meta = pq.read_schema(path).metadata or {}
    assert not any(b"pandas" in k or b"pickle" in v for k, v in meta.items()), meta
    assert read_rows(path) == [{"trial_id": "a", "step": 0, "class_iou": [0.5, None], "param_kd": 10.0}]


def test_index_lists_refuse_pickled_arrays(tmp_path):
    from csseg_core.data import read_index_list

    marker = tmp_path / "marker"
    arr = np.array([Evil(marker)], dtype=object)
    np.save(tmp_path / "train-0.npy", arr, allow_pickle=True)
    with pytest.raises(DataError):
        read_index_list(tmp_path, 0, ("a", "b"))
    assert not marker.exists()
