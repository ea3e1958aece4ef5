"""The calm live view of ``csseg sweep``: one table fed by Tune's callbacks, Ray's chatter in a file.

While a sweep runs, the driver process keeps a :class:`SweepProgress` (one :class:`TrialRow` per
Tune trial, updated by :class:`LiveCallback` from ``on_trial_start/result/complete/error``) and
shows it as one ``rich`` table (:func:`build_table`): per grid cell and trial its state, step /
steps, the latest validation and test mIoU and the elapsed time, under the sweep's progress
(trials done / total, ETA) and the Ray dashboard URL. When stdout is not a terminal (tests, CI,
pipes), :class:`LiveView` prints plain lines instead: one per finished trial and at most one
progress line per :data:`PLAIN_EVERY_S`.

:func:`ray_output_to_file` sends the Python loggers of Ray, Tune and Optuna (and ``warnings``)
to ``<sweep>/sweep.log``; ``ray_session.py`` also starts Ray with ``log_to_driver=False`` and Tune
with ``verbose=0``, so worker prints stay in Ray's session logs, whose path is written to
``sweep.log`` and whose worker outputs are appended to it when the sweep started Ray itself.
``SweepSpec.verbose >= 1`` (``csseg sweep --verbose``) keeps Ray's own console output instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from csseg_core.metrics import format_percent

#: plain (non-terminal) mode: at most one progress line per this many seconds between trial ends
PLAIN_EVERY_S = 60.0
#: loggers whose records go to ``sweep.log`` while a calm sweep runs
LOGGERS = ("ray", "optuna", "py.warnings", "filelock", "pyarrow", "torch")
LOG_FORMAT = "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"
ENDED = ("ok", "error", "stopped")
STYLES = {"running": "cyan", "ok": "green", "error": "bold red", "stopped": "yellow", "pending": "dim"}


@dataclass
class TrialRow:
    """What the table shows of one trial (driver-side view of Tune's events)."""

    cell: str
    trial_id: str
    last_step: int
    state: str = "running"  # running | ok | error | stopped
    step: int | None = None  # the last continual step reported
    val: float | None = None
    test: float | None = None
    started: float = 0.0
    ended: float | None = None
    error: str | None = None
    error_path: str | None = None

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


@dataclass
class SweepProgress:
    """The sweep as the driver sees it: its cells, the trials started so far, the clock."""

    cells: list[str]
    trials_per_cell: int
    last_step: dict[str, int]  # cell -> its last continual step (the steps a trial runs are 1..last_step)
    metric: str = "val_miou_all"  # the ranking metric: ``val`` column; its test twin: ``test`` column
    dashboard_url: str | None = None
    log_path: str | None = None
    started: float = field(default_factory=time.time)
    trials: dict[str, TrialRow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return len(self.cells) * self.trials_per_cell

    @property
    def done(self) -> int:
        return sum(t.state in ENDED for t in self.trials.values())

    @property
    def test_metric(self) -> str:
        return self.metric[len("val_"):] if self.metric.startswith("val_") else self.metric

    @property
    def val_metric(self) -> str:
        return self.metric if self.metric.startswith("val_") else f"val_{self.metric}"

    # ------------------------------------------------------------------ events
    def start(self, cell: str, trial_id: str, now: float) -> TrialRow:
        with self.lock:
            row = self.trials.get(trial_id)
            if row is None:
                row = self.trials[trial_id] = TrialRow(cell, trial_id, self.last_step.get(cell, 1), started=now)
            row.state, row.ended = "running", None  # a restored trial runs again
            return row

    def result(self, cell: str, trial_id: str, result: dict, now: float) -> TrialRow:
        row = self.trials.get(trial_id) or self.start(cell, trial_id, now)
        with self.lock:
            if result.get("step") is not None:
                row.step = int(result["step"])
            for attr, key in (("val", self.val_metric), ("test", self.test_metric)):
                if result.get(key) is not None:
                    setattr(row, attr, float(result[key]))
            return row

    def end(self, cell: str, trial_id: str, now: float, error: str | None = None,
            error_path: str | None = None) -> TrialRow:
        row = self.trials.get(trial_id) or self.start(cell, trial_id, now)
        with self.lock:
            row.ended = now
            if error is not None or error_path is not None:
                row.state, row.error, row.error_path = "error", error or "failed", error_path
            else:
                row.state = "ok" if (row.step or 0) >= row.last_step else "stopped"
            return row

    # ------------------------------------------------------------------ summary
    def fraction(self) -> float:
        """Share of the sweep's continual steps done (ended trials count in full)."""
        total = sum(self.trials_per_cell * max(1, self.last_step.get(c, 1)) for c in self.cells)
        done = 0.0
        for t in self.trials.values():
            steps = max(1, t.last_step)
            done += steps if t.state in ENDED else min(steps, t.step or 0)
        return min(1.0, done / total) if total else 1.0

    def eta_s(self, now: float) -> float | None:
        """Seconds left, extrapolated from the steps done so far (None before the first step)."""
        frac = self.fraction()
        if frac <= 0:
            return None
        if frac >= 1:
            return 0.0
        return (now - self.started) * (1 - frac) / frac


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _pct(x: float | None) -> str:
    return format_percent(x, missing="-")


def headline(progress: SweepProgress, now: float) -> str:
    """``trials 3/8 done · 1 error · elapsed 2m10s · ETA 4m05s · dashboard URL``."""
    parts = [f"trials {progress.done}/{progress.total} done"]
    errors = sum(t.state == "error" for t in progress.trials.values())
    if errors:
        parts.append(f"{errors} error{'s' if errors > 1 else ''}")
    eta = progress.eta_s(now)
    parts += [f"elapsed {_duration(now - progress.started)}", f"ETA {_duration(eta)}"]
    if progress.dashboard_url:
        parts.append(f"dashboard {progress.dashboard_url}")
    return " · ".join(parts)


def _rows_shown(progress: SweepProgress, max_rows: int | None) -> tuple[list[TrialRow], int]:
    """Running trials and errors first, then the most recent ends; the rest is counted, not shown."""
    rows = list(progress.trials.values())
    if max_rows is None or len(rows) <= max_rows:
        return rows, 0
    rank = {"running": 0, "error": 1}
    keep = sorted(rows, key=lambda t: (rank.get(t.state, 2), -(t.ended or t.started)))[:max_rows]
    keep_ids = {t.trial_id for t in keep}
    return [t for t in rows if t.trial_id in keep_ids], len(rows) - len(keep)


def _error_line(t: TrialRow, width: int | None) -> Text:
    """``error <trial>: <message> (log: <path>)``, the message shortened to keep it on one line."""
    where = f" (log: {t.error_path})" if t.error_path else ""
    head = f"error {t.trial_id}: "
    message = t.error or "failed"
    if width is not None and len(head) + len(message) + len(where) > width:
        keep = max(12, width - len(head) - len(where) - 1)
        message = message[:keep] + "…" if len(message) > keep else message
    line = Text(head + message, style="red")
    line.append(where)
    return line


def build_table(progress: SweepProgress, now: float | None = None, max_rows: int | None = None,
                width: int | None = None) -> Group:
    """The live view: the sweep's headline, one table row per trial (grouped by cell; a cell not
    started yet is one ``pending`` row), then one line per failed trial with its log and the path
    of ``sweep.log``.

    Args:
        progress: the sweep's state (trials started so far).
        now: the clock (``time.time()``); fixed in tests.
        max_rows: show at most this many trial rows (running and errors first); None = all.
        width: the terminal's width: an error's message is shortened so that its line fits.
    """
    now = time.time() if now is None else now
    with progress.lock:
        rows, hidden = _rows_shown(progress, max_rows)
        table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
        kind = progress.test_metric.replace("miou_", "")
        for name, justify in (("cell", "left"), ("trial", "left"), ("state", "left"), ("step", "right"),
                              (f"val {kind} %", "right"), (f"test {kind} %", "right"), ("time", "right")):
            table.add_column(name, justify=justify, no_wrap=True)
        started_cells = {t.cell for t in progress.trials.values()}
        for cell in progress.cells:
            if cell not in started_cells:
                n = progress.trials_per_cell
                table.add_row(cell, "", Text("pending", style=STYLES["pending"]), f"{n} trial{'s' if n > 1 else ''}",
                              "", "", "")
                continue
            for i, t in enumerate(t for t in rows if t.cell == cell):
                step = "-" if t.step is None else str(t.step)
                table.add_row(cell if i == 0 else "", t.trial_id, Text(t.state, style=STYLES.get(t.state, "")),
                              f"{step}/{t.last_step}", _pct(t.val), _pct(t.test), _duration(t.elapsed(now)))
        notes = Text()
        if hidden:
            notes.append(f"… {hidden} finished trial(s) not shown (csseg results DIR)\n", style="dim")
        for t in progress.trials.values():  # errors: one line each, with the path of the trial's error log
            if t.state == "error":
                notes.append_text(_error_line(t, width))
                notes.append("\n")
        if progress.log_path:
            notes.append(f"Ray/Tune log: {progress.log_path}", style="dim")
        notes.rstrip()
        head = Text(headline(progress, now), style="bold")
        return Group(head, table, notes) if notes.plain else Group(head, table)


def plain_line(progress: SweepProgress, row: TrialRow | None, now: float) -> str:
    """One line of plain (non-terminal) progress: a trial's end, or the running trials."""
    head = f"[{progress.done}/{progress.total} trials, ETA {_duration(progress.eta_s(now))}]"
    if row is None:
        running = [t for t in progress.trials.values() if t.state == "running"]
        steps = ", ".join(f"{t.trial_id} step {'-' if t.step is None else t.step}/{t.last_step}" for t in running)
        return f"{head} running: {steps or 'none'}"
    line = (f"{head} {row.cell} {row.trial_id} {row.state} at step {'-' if row.step is None else row.step}/"
            f"{row.last_step}: val {_pct(row.val)} test {_pct(row.test)} in {_duration(row.elapsed(now))}")
    if row.state == "error":
        line += f": {row.error}" + (f" (log: {row.error_path})" if row.error_path else "")
    return line


# ---------------------------------------------------------------------------- display
class LiveView:
    """Shows a :class:`SweepProgress`: a ``rich.live.Live`` table on a terminal, plain lines otherwise."""

    def __init__(self, progress: SweepProgress, console: Console | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.progress = progress
        self.stream = sys.stdout  # the terminal, kept while the sweep's own prints go to sweep.log
        self.console = console or Console(file=self.stream)
        self.live_mode = self.console.is_terminal and not self.console.is_dumb_terminal
        self.echo = echo or (lambda s: print(s, file=self.stream, flush=True))
        self._live = None
        self._last_plain = 0.0

    def _renderable(self):
        height = self.console.size.height
        return build_table(self.progress, max_rows=max(4, height - 12), width=self.console.size.width)

    def __enter__(self) -> "LiveView":
        if self.live_mode:
            from rich.live import Live

            self._live = Live(get_renderable=self._renderable, console=self.console, refresh_per_second=1,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            self._live = None

    def update(self, row: TrialRow | None = None, ended: bool = False) -> None:
        """An event happened (``ended``: a trial ended); the live table refreshes by itself."""
        if self._live is not None:
            self._live.refresh()
            return
        now = time.time()
        if ended:
            self.echo(plain_line(self.progress, row, now))
            self._last_plain = now
        elif now - self._last_plain >= PLAIN_EVERY_S:
            self.echo(plain_line(self.progress, None, now))
            self._last_plain = now


def make_callback(view: LiveView, cell_of: Callable[[], str]):
    """A Tune callback feeding ``view`` (created lazily: Ray is imported only when a sweep runs)."""
    from ray import tune

    class LiveCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            view.update(view.progress.start(cell_of(), trial.trial_id, time.time()))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            view.update(view.progress.result(cell_of(), trial.trial_id, result, time.time()))

        def on_trial_complete(self, iteration, trials, trial, **info):
            view.update(view.progress.end(cell_of(), trial.trial_id, time.time()), ended=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            path = getattr(trial, "error_file", None)
            message = None
            try:
                if path and Path(path).exists():
                    lines = [ln for ln in Path(path).read_text().strip().splitlines() if ln.strip()]
                    message = lines[-1][:200] if lines else None
            except OSError:
                pass
            view.update(view.progress.end(cell_of(), trial.trial_id, time.time(), error=message or "failed",
                                          error_path=path), ended=True)

    return LiveCallback()


# ---------------------------------------------------------------------------- Ray's output -> file
@contextlib.contextmanager
def ray_output_to_file(path: Path) -> Iterator[logging.Handler]:
    """Send the records of Ray's, Tune's and Optuna's Python loggers (and ``warnings``) to ``path``.

    Their own console handlers are removed meanwhile and put back afterwards.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


@contextlib.contextmanager
def prints_to_file(path: Path) -> Iterator[None]:
    """``print`` to ``sys.stdout``/``sys.stderr`` goes to ``path`` (Tune prints its experiment tables)."""
    with open(path, "a", encoding="utf-8", buffering=1) as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def append_worker_logs(log_path: Path, logs_dir: str | None, max_bytes: int = 1 << 20) -> int:
    """Append the non-empty ``worker-*.out/err`` files of Ray's session to ``log_path``; returns how many."""
    if not logs_dir or not Path(logs_dir).is_dir():
        return 0
    count = 0
    with open(log_path, "a", encoding="utf-8") as out:
        for f in sorted(Path(logs_dir).glob("worker-*")):
            if f.suffix not in (".out", ".err") or not f.is_file() or f.stat().st_size == 0:
                continue
            data = f.read_bytes()[-max_bytes:].decode("utf-8", "replace")
            out.write(f"\n===== {f} =====\n{data}")
            count += 1
    return count
