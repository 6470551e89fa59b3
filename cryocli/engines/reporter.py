"""What an engine reports through, and the run directory that a run's files go to.

* :class:`Reporter`: the progress bar with a live metric line (rich, on stderr; silent when its
  console is quiet), the per-epoch history, ``log.jsonl`` and ``metrics.csv``, the checkpoint hook and
  ``--resume``, and per-epoch scoring against a :class:`GroundTruth` (FSC after alignment, pose errors).
  Engines call :meth:`Reporter.start`, :meth:`Reporter.step`, :meth:`Reporter.end_epoch` and read
  :meth:`Reporter.resume_state`; they never print or write files.
* :class:`RunDirectory`: the files of a run (``map.mrc``, ``half1_unfil.mrc``/``half2_unfil.mrc``,
  ``particles.star``, ``fsc.star``, ``metrics.csv``, ``log.jsonl``, ``checkpoint.pt``, ``fsc.png``),
  each written atomically (temporary file + rename). An existing non-empty directory is refused unless
  ``force`` (or ``resume``) is given.

Units: Angstrom for resolutions, voxel sizes and origins; degrees for pose errors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from cryocli.engines.base import Reconstruction
from cryocli.errors import CryocliError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------------------ truth


@dataclass
class GroundTruth:
    """A known map (and optionally known poses) to score a run against: a developer and benchmark aid.

    volume: ``(n, n, n)`` at ``voxel_size`` Angstrom. rotations: ``(N, 3, 3)`` true RELION ``A`` of every
    input particle (table order) or ``None``. every: score the map every this many epochs (and at the
    last one); map scoring aligns the maps (:func:`cryocli.analysis.align.align_maps`, a few seconds at
    small boxes), pose scoring is cheap and done every epoch.
    """

    volume: Tensor
    voxel_size: float
    rotations: Tensor | None = None
    every: int = 1

    def volume_at(self, box: int, voxel_size: float) -> Tensor:
        """The true map Fourier-resampled to an engine's box (same field of view required)."""
        from cryocli.imaging.fourier import fourier_resample_volume

        n = self.volume.shape[-1]
        if abs(n * self.voxel_size - box * voxel_size) > 0.01 * n * self.voxel_size:
            raise CryocliError(f"--ground-truth covers {n * self.voxel_size:.1f} A but the particles cover "
                               f"{box * voxel_size:.1f} A; give a map of the same field of view")
        return fourier_resample_volume(self.volume.to(torch.float32), box)

    def score_map(self, volume: Tensor, voxel_size: float) -> dict[str, Any]:
        """FSC of ``volume`` against the truth after aligning it (rotation, shift, hand).

        Returns ``fsc`` (per shell), ``frequency`` (1/A), ``res_fsc05``/``res_fsc0143`` (Angstrom, the
        interpolated crossings; Nyquist when never crossed), ``aligned`` (the aligned map) and ``flipped``.
        """
        from cryocli.analysis.align import align_maps
        from cryocli.analysis.fsc import fsc_curve, shell_frequency, threshold_crossing

        n = volume.shape[-1]
        truth = self.volume_at(n, voxel_size)
        vol = volume.detach().to("cpu", torch.float32)
        alignment = align_maps(truth, vol, voxel_size)
        fsc = fsc_curve(truth, alignment.aligned_map)
        return {"fsc": fsc, "frequency": shell_frequency(n, voxel_size),
                "res_fsc05": threshold_crossing(fsc, n, voxel_size, 0.5).resolution,
                "res_fsc0143": threshold_crossing(fsc, n, voxel_size, 0.143).resolution,
                "aligned": alignment.aligned_map, "flipped": alignment.flipped}

    def score_poses(self, rotations: Tensor, rows: np.ndarray) -> dict[str, float]:
        """Rotation errors (degrees) of estimated poses of the particles at ``rows`` after the best global
        rotation and hand (:func:`cryocli.analysis.align.pose_errors_after_alignment`)."""
        from cryocli.analysis.align import pose_errors_after_alignment

        if self.rotations is None:
            return {}
        true = self.rotations[torch.as_tensor(rows)].to(torch.float64)
        err = pose_errors_after_alignment(rotations.detach().to("cpu", torch.float64), true)
        return {"rot_err_median": float(np.median(err)), "rot_err_mean": float(np.mean(err))}


# ------------------------------------------------------------------------------------------------ files


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.ndarray, Tensor)):
        return np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value).tolist()
    if isinstance(value, Path):
        return str(value)
    return value


class RunDirectory:
    """The output directory of a run.

    path: the directory. force: allow a non-empty directory (its run files are overwritten). resume:
    continue a run in it (it must hold ``checkpoint.pt``). Without ``resume`` the log starts afresh.
    """

    def __init__(self, path: str | Path, force: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        if resume:
            if not (self.path / CHECKPOINT).is_file():
                raise CryocliError(f"--resume: no {CHECKPOINT} in the output directory", self.path)
        elif self.path.exists():
            if not self.path.is_dir():
                raise CryocliError("output exists and is not a directory", self.path)
            if any(self.path.iterdir()) and not force:
                raise CryocliError("output directory is not empty; pass --force to overwrite it or --resume "
                                   "to continue the run in it", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.path / "log.jsonl").write_text("")

    def file(self, name: str) -> Path:
        return self.path / name

    # ----- log, metrics, checkpoint ------------------------------------------------------------------
    def append_log(self, record: dict[str, Any]) -> None:
        """Add one JSON line to ``log.jsonl`` (flushed at once, so a crashed run keeps its log)."""
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, default=_json_value)
        with open(self.path / "log.jsonl", "a") as fh:
            fh.write(line + "\n")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """``metrics.csv``: one row per epoch, one column per metric (union over epochs)."""
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _json_value(v) for k, v in row.items()})
        _atomic_bytes(self.path / "metrics.csv", buf.getvalue().encode())

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``checkpoint.pt`` (torch.save), replaced atomically."""
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        _atomic_bytes(self.path / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any]:
        try:
            checkpoint = torch.load(self.path / CHECKPOINT, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise CryocliError(f"cannot read the checkpoint: {exc}", self.path / CHECKPOINT) from None
        if not isinstance(checkpoint, dict) or checkpoint.get("version") != CHECKPOINT_VERSION:
            raise CryocliError("not a cryocli checkpoint of this version", self.path / CHECKPOINT)
        return checkpoint

    # ----- results -----------------------------------------------------------------------------------
    def write_result(self, result: Reconstruction, table: Any, command: str,
                     truth_scores: dict[str, Any] | None = None) -> dict[str, str]:
        """Write the maps, ``particles.star`` (input columns kept, poses and origins in RELION 3.1 form, only
        the particles the run used), ``fsc.star`` with half maps, and ``fsc.png`` when there are curves to
        plot. Returns ``{kind: path}`` of what was written."""
        from cryocli.analysis.fsc import fsc_star_text, shell_frequency, threshold_crossing
        from cryocli.io.paths import atomic_write_text
        from cryocli.geometry.rotations import matrix_to_euler
        from cryocli.io.mrc import write_map
        from cryocli.io.star import write_star
        from cryocli.plots import plot_fsc

        written: dict[str, str] = {}
        vs = float(result.voxel_size)
        write_map(self.file("map.mrc"), result.volume.detach().cpu().numpy(), vs, command)
        written["map"] = str(self.file("map.mrc"))
        if result.half_volumes is not None:
            for i, half in enumerate(result.half_volumes, start=1):
                name = f"half{i}_unfil.mrc"
                write_map(self.file(name), np.asarray(torch.as_tensor(half).detach().cpu()), vs, command)
                written[f"half{i}"] = str(self.file(name))
        rows = result.particle_rows if result.particle_rows is not None else np.arange(len(table))
        rot, tilt, psi = matrix_to_euler(result.rotations.detach().cpu().to(torch.float64))
        posed = table.subset(rows).with_poses(rot.numpy(), tilt.numpy(), psi.numpy(),
                                              result.origins_angstrom.detach().cpu().to(torch.float64).numpy())
        write_star(posed, self.file("particles.star"))
        written["particles"] = str(self.file("particles.star"))
        n = int(result.volume.shape[-1])
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        resolutions: dict[str, float] = {}
        gold = result.info.get("gold_standard_fsc")
        if gold is not None:
            atomic_write_text(self.file("fsc.star"), fsc_star_text(np.asarray(gold), n, vs, command))
            written["fsc_star"] = str(self.file("fsc.star"))
            curves["half maps"] = (shell_frequency(n, vs), np.asarray(gold))
            resolutions["half maps (0.143)"] = threshold_crossing(np.asarray(gold), n, vs, 0.143).resolution
        if truth_scores is not None:
            curves["map vs ground truth"] = (truth_scores["frequency"], truth_scores["fsc"])
            resolutions["vs truth (0.5)"] = truth_scores["res_fsc05"]
        if curves:
            plot_fsc(self.file("fsc.png"), curves, resolutions=resolutions, title=command)
            written["fsc_plot"] = str(self.file("fsc.png"))
        written["metrics"] = str(self.file("metrics.csv"))
        written["log"] = str(self.file("log.jsonl"))
        written["checkpoint"] = str(self.file(CHECKPOINT))
        return written


# ------------------------------------------------------------------------------------------------ reporter


class Reporter:
    """Progress, metrics, logs, checkpoints and ground-truth scores of a run.

    console: where the progress bar goes (``Console(quiet=True)`` or ``None`` for none). run_dir: where
    logs and checkpoints go (``None``: kept in memory only, e.g. in tests). ground_truth: score epochs
    against it. resume: load ``run_dir``'s checkpoint; engines then get their saved state from
    :meth:`resume_state`. meta: values stored with the checkpoint (method, configuration).
    """

    def __init__(self, console: Console | None = None, run_dir: RunDirectory | None = None,
                 ground_truth: GroundTruth | None = None, resume: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        self.console = console
        self.run_dir = run_dir
        self.ground_truth = ground_truth
        self.history: list[dict[str, Any]] = []
        self.meta = dict(meta or {})
        self.run_name = "full"
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_truth_scores: dict[str, Any] | None = None
        self._progress: Progress | None = None
        self._task: int | None = None
        self._t0 = time.perf_counter()
        self._checkpoint: dict[str, Any] = {"version": CHECKPOINT_VERSION, "meta": self.meta, "runs": {},
                                            "history": []}
        if resume:
            if run_dir is None:
                raise ValueError("resume needs a run directory")
            saved = run_dir.load_checkpoint()
            old_method, new_method = saved.get("meta", {}).get("method"), self.meta.get("method")
            if old_method and new_method and old_method != new_method:
                raise CryocliError(f"--resume: the checkpoint is a {old_method} run, not {new_method}",
                                   run_dir.file(CHECKPOINT))
            self._checkpoint = saved
            self._checkpoint["meta"] = {**saved.get("meta", {}), **self.meta}
            self.history = list(saved.get("history", []))
            self.event("resume", epochs_done=len(self.history))

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
        self._checkpoint["runs"][self.run_name] = {"state": entry.get("state"), "result": result.state(),
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

    def step(self, k: int = 1, **live: float | str) -> None:
        """Advance the bar by ``k`` steps; ``live`` values (loss, ...) replace the metric line."""
        if self._progress is None or self._task is None:
            return
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
        and the engine ``state`` as the checkpoint. Returns the recorded row."""
        row: dict[str, Any] = {"run": self.run_name, "epoch": epoch, **metrics,
                               "elapsed_s": round(time.perf_counter() - self._t0, 3)}
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
        self.event("epoch", **{k: v for k, v in row.items() if k != "run"})
        if self.run_dir is not None:
            self.run_dir.write_metrics(self.history)
        if state is not None:
            self._checkpoint["runs"][self.run_name] = {"state": state}
            self._save()
        if self._progress is not None and self._task is not None:
            keys = ("loss", "res_fsc05_A", "rot_err_median")
            summary = "  ".join(f"{k} {_fmt(row[k])}" for k in keys if k in row)
            self._progress.console.log(f"{self.run_name}: epoch {epoch}: {summary}", markup=False)
        return row

    def event(self, name: str, **fields: Any) -> None:
        """One line in ``log.jsonl``."""
        if self.run_dir is not None:
            self.run_dir.append_log({"time": round(time.time(), 3), "event": name, "run": self.run_name, **fields})

    def close(self) -> None:
        self._stop_progress()

    def _save(self) -> None:
        self._checkpoint["history"] = self.history
        if self.run_dir is not None:
            self.run_dir.save_checkpoint(self._checkpoint)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
