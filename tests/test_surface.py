"""The packages' surface (issue 14 item 4): what other packages import from ``csseg_core`` is declared
in ``csseg_core.__all__`` and public; module names say one job and shadow nothing; no module is long.

The first checks read the files alone (AST); the last two try the public hooks bench/ uses instead of
patching engine globals and writing the step-0 cache's files itself.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import csseg_core

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("csseg_core", "sweeper", "search_spaces", "csseg_cli")
PRODUCT = sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py")) + [ROOT / "cli.py"]
#: what other packages may use csseg_core from (tests may reach further in)
CLIENTS = sorted(p for d in ("sweeper", "search_spaces", "csseg_cli", "bench") for p in (ROOT / d).rglob("*.py")) + [ROOT / "cli.py"]
MAX_LINES = 400


def _core_imports(path: Path):
    """(line, module, names) of every import of csseg_core in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "csseg_core":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "csseg_core":
                    yield node.lineno, a.name, []


def test_other_packages_import_only_the_declared_public_surface_of_csseg_core():
    bad = []
    for path in CLIENTS:
        for line, module, names in _core_imports(path):
            parts = module.split(".")
            if module == "csseg_core":  # from csseg_core import <module>
                parts = ["csseg_core", *names[:1]] if names else parts
                names = []
            if len(parts) > 1 and parts[1] not in csseg_core.__all__:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} is not in csseg_core.__all__")
            if any(part.startswith("_") for part in parts[1:]) or any(n.startswith("_") for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{line}: private name from {module}: {names}")
    assert not bad, "\n".join(bad)


def test_the_declared_modules_exist():
    for name in csseg_core.__all__:
        assert (ROOT / "csseg_core" / f"{name}.py").is_file() or (ROOT / "csseg_core" / name / "__init__.py").is_file(), name


def test_no_module_shadows_the_standard_library_or_reuses_another_modules_name():
    stems: dict[str, list[str]] = {}
    for path in PRODUCT:
        if path.name != "__init__.py":
            stems.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert not sorted(set(stems) & set(sys.stdlib_module_names))
    methods = {p.stem for p in (ROOT / "csseg_core" / "methods").glob("*.py")}
    # a method and its search space share the method's name (found by it); csseg_core.report
    # reports a run folder and sweeper.report a sweep folder with its figures
    repeated = {s: where for s, where in stems.items() if len(where) > 1 and s not in methods and s != "report"}
    assert not repeated


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PRODUCT if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_timed_phases_times_the_plan_and_engine_functions_and_restores_them():
    import csseg_core.engine as E
    import csseg_core.plan as P

    originals = (P.build_datasets, P.build_model, E.evaluate)
    with E.timed_phases() as phases:
        assert (P.build_datasets, P.build_model, E.evaluate) != originals
        P.build_model("tiny", (2,), pretrained=None)
    assert (P.build_datasets, P.build_model, E.evaluate) == originals
    assert set(phases) == {"model build"} and phases["model build"] > 0


def test_seed_state_puts_a_step0_state_where_the_cache_loads_it(tmp_path):
    import json

    import pytest

    step0_cache = pytest.importorskip("sweeper.step0_cache")
    state = tmp_path / "s.pt"
    state.write_bytes(b"state")
    root = step0_cache.step0_dir(tmp_path / "sweep")
    step0_cache.seed_state(root, "k0", state, {"miou_all": 0.5}, trained_by="bench")
    assert step0_cache.state_path(root, "k0").read_bytes() == b"state"
    meta = json.loads(step0_cache.meta_path(root, "k0").read_text())
    assert meta == {"key": "k0", "metrics": {"miou_all": 0.5}, "trained_by": "bench"}
