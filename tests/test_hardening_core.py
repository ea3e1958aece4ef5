"""Hardening of ``csseg_core``'s files: atomic Parquet tables (:mod:`csseg_core.results`, through
:func:`csseg_core.atomic.atomic_path`) survive a writer interrupted or killed mid-write: every
finished row reads back, the final file is never truncated, temporary files are cleaned up or ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from hardening_fixtures import ROOT, isolated_fixture  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("isolated")


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


def test_atomic_path_replaces_the_whole_file_or_nothing(tmp_path):
    from csseg_core.atomic import atomic_path

    target = tmp_path / "sub" / "x.json"
    with atomic_path(target) as tmp:  # the folder is created; the temporary file is hidden, next to the target
        assert tmp.parent == target.parent and tmp.name.startswith(".x.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("two, half written")
        raise RuntimeError("the writer died")
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"], "the temporary file is removed"
