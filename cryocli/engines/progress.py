"""What an engine reports through: progress bar, live metric line, per-epoch history, log and checkpoints.

:class:`Reporter` draws the progress bar with a live metric line (rich, on stderr; silent when its console
is quiet), keeps the per-epoch history (``metrics.csv``), writes events to the run log, checkpoints the
engine's state each epoch and gives it back on ``--resume``, and scores epochs against a
:class:`~cryocli.analysis.ground_truth.GroundTruth` when one is given. Engines call :meth:`Reporter.start`,
:meth:`Reporter.step`, :meth:`Reporter.end_epoch` and read :meth:`Reporter.resume_state`; they never
print or write files. Files go through a :class:`RunFiles` (the run directory), or nowhere (tests).

Timing is logged (``log.jsonl``), never put in the history or the checkpoint, so that a run's data files
are the same bytes for the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from cryocli.analysis.ground_truth import GroundTruth
from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError

CHECKPOINT_VERSION = 2
#: Seconds between redraws of the live metric line (each reads the values given to :meth:`Reporter.step`).
LIVE_REFRESH_S = 0.25


class RunFiles(Protocol):
    """Where a run's log, metrics and checkpoints go (:class:`cryocli.io.run_directory.RunDirectory`)."""

    def append_log(self, record: dict[str, Any]) -> None: ...

    def write_metrics(self, history: list[dict[str, Any]]) -> None: ...

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    def load_checkpoint(self) -> dict[str, Any]: ...

    def write_progress_report(self, history: list[dict[str, Any]], volume: Tensor, voxel_size: float,
                              rotations: Tensor | None, sym: str = "C1") -> None: ...


class Reporter:
    """Progress, metrics, logs, checkpoints and ground-truth scores of a run.

    console: where the progress bar goes (``Console(quiet=True)`` or ``None`` for none). files: where
    logs, metrics and checkpoints go (``None``: kept in memory only, e.g. in tests). ground_truth: score epochs
    against it. resume: load the checkpoint of ``files``; engines then get their saved state from
    :meth:`resume_state`. meta: values stored with the checkpoint (method, configuration). check_saved: called with
    the checkpoint's stored ``meta`` before it is resumed; raises to refuse it (the engine's options differ).
    """

    def __init__(self, console: Console | None = None, files: RunFiles | None = None,
                 ground_truth: GroundTruth | None = None, resume: bool = False,
                 meta: dict[str, Any] | None = None,
                 check_saved: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.console = console
        self.files = files
        self.ground_truth = ground_truth
        self.history: list[dict[str, Any]] = []
        self.elapsed_s: list[float] = []  # seconds since the start at each recorded epoch (logged, never saved)
        self.meta = dict(meta or {})
        self.run_name = "full"
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_truth_scores: dict[str, Any] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._live_at = -float("inf")  # when the metric line was last drawn (time.monotonic)
        self._t0 = time.perf_counter()
        self._check_saved = check_saved
        self.checkpointed = resume
        self._checkpoint: dict[str, Any] = {"version": CHECKPOINT_VERSION, "meta": self.meta, "runs": {},
                                            "history": []}
        if resume:
            if files is None:
                raise ValueError("resume needs a run directory")
            self.adopt(files.load_checkpoint())
            self.event("resume", epochs_done=len(self.history))

    @property
    def checkpoint(self) -> dict[str, Any]:
        """What the run directory's checkpoint holds (runs, their states and results, the history)."""
        return self._checkpoint

    def adopt(self, saved: dict[str, Any]) -> None:
        """Resume from the checkpoint ``saved`` (read from the run directory, or under torchrun rank 0's)."""
        old_method, new_method = saved.get("meta", {}).get("method"), self.meta.get("method")
        if old_method and new_method and old_method != new_method:
            raise CryocliError(f"the checkpoint to resume is a {old_method} run, not {new_method}")
        if self._check_saved is not None:
            self._check_saved(saved.get("meta", {}))
        self._checkpoint = saved
        self._checkpoint["meta"] = {**saved.get("meta", {}), **self.meta}
        self.history = list(saved.get("history", []))
        self.checkpointed = True

    # ----- runs --------------------------------------------------------------------------------------
    def begin_run(self, name: str, rows: np.ndarray) -> None:
        """A new (possibly resumed) run on the input particles at ``rows`` (0-based table rows)."""
        self.run_name = name
        self.rows = np.asarray(rows)
        self.event("run", particles=len(self.rows))

    def resume_state(self) -> dict[str, Any] | None:
        """The engine state saved at the last finished epoch of this run, or ``None``."""
        entry = self._checkpoint["runs"].get(self.run_name)
        return None if entry is None else entry.get("state")

    def finished_result(self, epochs: int) -> Reconstruction | None:
        """This run's result when the checkpoint holds it finished after ``epochs`` epochs (a run asked
        for more epochs continues from its last state instead)."""
        entry = self._checkpoint["runs"].get(self.run_name)
        if entry is None or "result" not in entry or entry.get("epochs") != epochs:
            return None
        self.event("run_already_finished")
        return Reconstruction.from_state(entry["result"])

    def finish_run(self, result: Reconstruction, epochs: int) -> None:
        """Store the finished run (after ``epochs`` epochs) with its last state, and close its progress bar."""
        entry = self._checkpoint["runs"].get(self.run_name, {})
        self._checkpoint["runs"][self.run_name] = {"state": entry.get("state"), "result": result.as_state(),
                                                   "epochs": epochs}
        self._save()
        self._stop_progress()
        self.event("run_finished")

    # ----- progress ----------------------------------------------------------------------------------
    def start(self, total_steps: int, description: str, completed: int = 0) -> None:
        """Open the progress bar of this run: ``total_steps`` steps, ``completed`` already done."""
        self._stop_progress()
        if self.console is None or self.console.quiet:
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[line]}")]
        self._progress = Progress(*columns, console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(f"{description} [{self.run_name}]", total=total_steps,
                                             completed=completed, line="")

    def step(self, k: int = 1, **live: float | str | Tensor) -> None:
        """Advance the bar by ``k`` steps; ``live`` values (loss, ...) replace the metric line.

        A value may be a 0-dim tensor on the engine's device: it is read (a host synchronisation on a GPU) only
        when the line is redrawn, at most every :data:`LIVE_REFRESH_S` seconds, not at every step."""
        if self._progress is None or self._task is None:
            return
        now = time.monotonic()
        if now - self._live_at < LIVE_REFRESH_S:
            self._progress.update(self._task, advance=k)
            return
        self._live_at = now
        line = "  ".join(f"{key} {_fmt(v)}" for key, v in live.items())
        self._progress.update(self._task, advance=k, line=line)

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task = None, None

    # ----- epochs ------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, metrics: dict[str, Any], volume: Tensor | None = None,
                  voxel_size: float | None = None, rotations: Tensor | None = None,
                  state: dict[str, Any] | None = None, last: bool = False) -> dict[str, Any]:
        """Record epoch ``epoch`` (1-based): its ``metrics``, scores against the ground truth (map every
        ``ground_truth.every`` epochs and at the ``last``, poses every epoch), one log line, ``metrics.csv``,
        the engine ``state`` as the checkpoint and, with it, the run's ``report.png`` of the current ``volume``.
        Returns the recorded row."""
        row: dict[str, Any] = {"run": self.run_name, "epoch": epoch, **metrics}
        gt = self.ground_truth
        if gt is not None:
            if rotations is not None:
                row.update(gt.score_poses(rotations, self.rows))
            if volume is not None and voxel_size is not None and (last or epoch % max(1, gt.every) == 0):
                scores = gt.score_map(volume, voxel_size)
                self.last_truth_scores = scores
                row["res_fsc05_A"] = scores["res_fsc05"]
                row["res_fsc0143_A"] = scores["res_fsc0143"]
        self.history.append(row)
        self.elapsed_s.append(time.perf_counter() - self._t0)
        self.event("epoch", **{k: v for k, v in row.items() if k != "run"}, elapsed_s=round(self.elapsed_s[-1], 3))
        if self.files is not None:
            self.files.write_metrics(self.history)
        if state is not None:
            self._checkpoint["runs"][self.run_name] = {"state": state}
            self._save()
            if self.files is not None and volume is not None and voxel_size is not None:
                sym = str(self.meta.get("config", {}).get("sym", "C1"))
                self.files.write_progress_report(self.history, volume, voxel_size, rotations, sym)
        if self._progress is not None and self._task is not None:
            keys = ("loss", "res_fsc05_A", "rot_err_median")
            summary = "  ".join(f"{k} {_fmt(row[k])}" for k in keys if k in row)
            self._progress.console.log(f"{self.run_name}: epoch {epoch}: {summary}", markup=False)
        return row

    def event(self, name: str, **fields: Any) -> None:
        """One line in ``log.jsonl``."""
        if self.files is not None:
            self.files.append_log({"time": round(time.time(), 3), "event": name, "run": self.run_name, **fields})

    def close(self) -> None:
        """Close the progress bar (the run may go on being logged)."""
        self._stop_progress()

    def _save(self) -> None:
        self._checkpoint["history"] = self.history
        if self.files is not None:
            self.files.save_checkpoint(self._checkpoint)
            self.checkpointed = True


def _fmt(value: Any) -> str:
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
