"""Shared helpers of the hardening tests (``tests/test_hardening_*.py``): drive a CLI command
and check that bad input ends in ONE ``error:`` line; a private ``$CSSEG_HOME`` and CWD per test;
a tiny synthetic VOC set that tests may corrupt.

A test module imports the fixture *functions* (``from hardening_fixtures import isolated_fixture,
voc_fixture, voc_template_fixture  # noqa: F401``) and asks for ``isolated`` / ``voc`` / ``voc_template``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli

ROOT = Path(__file__).resolve().parents[1]
INFO_PREFIXES = ("run ", "csseg: ")
runner = CliRunner()


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


@pytest.fixture(name="isolated")
def isolated_fixture(tmp_path, monkeypatch):
    """Private $CSSEG_HOME and CWD: nothing of a failing command lands in the repo or the user's cache."""
    monkeypatch.setenv("CSSEG_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", name="voc_template")
def voc_template_fixture(tmp_path_factory):
    from csseg_core.data import synth

    return synth.generate(tmp_path_factory.mktemp("voc-template"), n_train=40, n_val=20, size=48)


@pytest.fixture(name="voc")
def voc_fixture(tmp_path, voc_template):
    """A private copy of the tiny synthetic VOC set (tests corrupt it)."""
    dst = tmp_path / "voc"
    shutil.copytree(voc_template, dst)
    return dst


def voc2012(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def first_id(root: Path, split: str = "train") -> str:
    return (voc2012(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]
