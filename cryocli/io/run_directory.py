"""The one writer of a run directory (``abinitio -o run/``, ``refine -o ref/``), and its guarantees.

Files: ``map.mrc`` (and ``map_unfil.mrc``), ``half1_unfil.mrc``/``half2_unfil.mrc`` (and a method's own regularised
``half1_regularised.mrc``/``half2_regularised.mrc``), ``particles.star`` (input columns kept, poses,
origins and the method's per-particle columns in RELION 3.1 form, image names as RELION writes them),
``model.star`` (refinement), ``fsc.star``, ``fsc.png``, ``report.png`` and ``angdist.bild`` (refreshed at each
checkpoint), ``metrics.csv``, ``log.jsonl``, ``checkpoint.pt``.

Guarantees:

* **One writer at a time**: the directory is locked (:func:`cryocli.io.locks.output_lock`) from
  :meth:`RunDirectory.open` to :meth:`RunDirectory.close`; a second run or ``--resume`` is refused
  with one line naming the holder.
* **Nothing is lost**: a run into an existing run directory (``force``) works in a sibling folder
  ``.<name>.new.run`` and replaces the old run only when it succeeds; a failed ``force`` run leaves the old
  one as it was. A fresh run that fails before its first checkpoint leaves nothing behind; one that is
  interrupted after it keeps its checkpoint for ``resume``.
* **No stale temporaries**: temporaries that a killed run left are removed when the directory is opened.
* **Umask**: files and folders get the user's umask (no private temporaries left as final files).
* **Reproducible bytes**: no clock time goes into a data file (only ``log.jsonl`` carries times).
* **No empty or broken maps**: a map that is not finite or all zero is refused before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError
from cryocli.io.locks import output_lock, remove_stale_temporaries
from cryocli.io.paths import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.pt"
#: Largest share of a run's time that refreshing its progress report may take.
REPORT_TIME_SHARE = 0.1
LOG = "log.jsonl"
METRICS = "metrics.csv"


class RunDirectory:
    """The output directory of a run.

    path: the directory. force: replace the run in a non-empty directory (only once the new run succeeds).
    resume: continue the run in it (it, or the unfinished ``force`` run beside it, must hold ``checkpoint.pt``).
    command: what runs, for the lock and the figures (``abinitio --method cryospin``). mass_kda: the molecule's
    mass, for the contour level in ``report.png`` (``None``: from the particle diameter).

    Construction only checks (nothing is created); :meth:`open` takes the lock and prepares the working
    folder, :meth:`commit` puts a finished run in place, :meth:`close` ends (and, for a run that failed
    before its first checkpoint, removes) what :meth:`open` made.
    """

    def __init__(self, path: str | Path, *, force: bool = False, resume: bool = False, command: str = "",
                 mass_kda: float | None = None) -> None:
        self.path = Path(path)
        self.force, self.resume, self.command = force, resume, command
        self.mass_kda = mass_kda
        # Not of the form ".{name}.<random>": remove_stale_temporaries must leave a resumable run alone.
        self.staging = self.path.with_name(f".{self.path.name}.new.run")
        self.work = self.path
        self._existed = self.path.exists()
        self._report_cost: float | None = None  # seconds the last progress report took
        self._report_done = 0.0
        self._committed = False
        self._stack = ExitStack()
        if self.path.exists() and not self.path.is_dir():
            raise CryocliError("output exists and is not a directory", self.path)
        if resume:
            if not (self.path / CHECKPOINT).is_file() and not (self.staging / CHECKPOINT).is_file():
                raise CryocliError(f"nothing to resume: no {CHECKPOINT} in the output directory", self.path)
        elif self.path.exists() and any(self.path.iterdir()) and not force:
            raise CryocliError("output directory is not empty; pass --force to replace it or --resume to continue "
                               "the run in it", self.path)
        check_writable_folder(self.path)

    # ----- life cycle --------------------------------------------------------------------------------
    def open(self) -> RunDirectory:
        """Lock the directory, clear what a killed run left, and choose the folder the run works in."""
        self._stack.enter_context(output_lock(self.path, self.command))
        parent = self.path.parent
        remove_stale_temporaries(parent, self.path.name)
        if self.resume:
            self.work = self.staging if (self.staging / CHECKPOINT).is_file() else self.path
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
            has_files = self.path.is_dir() and any(self.path.iterdir())
            self.work = self.staging if has_files else self.path
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / LOG).write_text("")
        shutil.rmtree(self.path.with_name(f".{self.path.name}.old"), ignore_errors=True)
        for leftover in self.work.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        return self

    def commit(self) -> None:
        """The run succeeded: put the working folder in place of the old run (when there was one)."""
        if self.work != self.path:
            old = self.path.with_name(f".{self.path.name}.old")
            os.replace(self.path, old)
            os.replace(self.work, self.path)
            shutil.rmtree(old, ignore_errors=True)
            self.work = self.path
        self._committed = True

    def close(self, keep: bool) -> None:
        """End the run. Unless it was committed or ``keep`` (an interrupted run with a checkpoint), remove
        what this run made: the staging folder of a ``force`` run, or a fresh run's folder."""
        try:
            if not self._committed and not keep and not self.resume:
                if self.work != self.path or not self._existed:
                    shutil.rmtree(self.work, ignore_errors=True)
                else:  # the user's empty folder: keep it, empty
                    for entry in self.path.iterdir():
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        finally:
            self._stack.close()

    def file(self, name: str) -> Path:
        """Where the run's file ``name`` is written now (the working folder)."""
        return self.work / name

    def final_file(self, name: str) -> Path:
        """Where the run's file ``name`` will be once the run is in place."""
        return self.path / name

    # ----- log, metrics, checkpoint (the Reporter's RunFiles) -------------------------------------------
    def append_log(self, record: dict[str, Any]) -> None:
        """Add one JSON line to ``log.jsonl`` (flushed at once, so a crashed run keeps its log)."""
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, default=_json_value)
        with open(self.work / LOG, "a", encoding="utf-8") as fh:
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
        atomic_write_text(self.work / METRICS, buf.getvalue())

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``checkpoint.pt`` (torch.save), replaced atomically."""
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(self.work / CHECKPOINT, buf.getvalue())

    def write_progress_report(self, history: list[dict[str, Any]], volume: Tensor, voxel_size: float,
                              rotations: Tensor | None, sym: str = "C1") -> None:
        """``report.png`` (and ``angdist.bild``) of a run in progress: the current map, its history and poses,
        refreshed at checkpoints so that a user watching a long run sees where it stands.

        A report costs about a second or more (matplotlib); it is skipped while less than
        :data:`REPORT_TIME_SHARE` ^-1 times its last cost has passed since the last one, so that refreshing
        takes at most ~10% of the run (measured without that: 24-31% of a 48 px refine). The final report,
        written with the result, does not depend on it."""
        now = time.perf_counter()
        if self._report_cost is not None and now - self._report_done < self._report_cost / REPORT_TIME_SHARE:
            return
        array = np.asarray(volume.detach().cpu(), dtype=np.float32)
        if not np.isfinite(array).all() or not np.any(array):
            return  # nothing worth drawing yet; the final result is checked before it is written
        epochs = {row.get("epoch") for row in history}
        title = f"{self.command} (running, {len(epochs)} epochs or iterations done)"
        self._write_report(title, array, voxel_size, {}, {}, {}, None, history, rotations, sym)
        self._report_done = time.perf_counter()
        self._report_cost = self._report_done - now

    def _write_report(self, title: str, volume: np.ndarray, voxel_size: float,
                      curves: dict[str, tuple[np.ndarray, np.ndarray]], thresholds: dict[str, float],
                      resolutions: dict[str, float], resolution: float | None, history: list[dict[str, Any]],
                      rotations: Tensor | None, sym: str, diameter_A: float | None = None,
                      epoch_label: str = "epoch") -> dict[str, str]:
        from cryocli.analysis.contour import contour_level
        from cryocli.report import ReportData, write_report

        level, basis = contour_level(volume, voxel_size, mass_kda=self.mass_kda, diameter_A=diameter_A)
        n = int(volume.shape[-1])
        rot = None if rotations is None else np.asarray(rotations.detach().cpu(), dtype=np.float64)
        data = ReportData(title=title, volume=volume, voxel_size=voxel_size, fsc=curves, fsc_thresholds=thresholds,
                          resolutions=resolutions, resolution_A=resolution, history=history, epoch_label=epoch_label,
                          rotations=rot, box=n, pixel_size=voxel_size, n_particles=None if rot is None else len(rot),
                          sym=sym, contour_level=level, contour_basis=basis)
        return write_report(self.work, data)

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the run to resume."""
        path = self.work / CHECKPOINT
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise CryocliError(f"cannot read the checkpoint: {exc}", path) from None
        from cryocli.engines.progress import CHECKPOINT_VERSION

        if not isinstance(checkpoint, dict) or checkpoint.get("version") != CHECKPOINT_VERSION:
            raise CryocliError("not a checkpoint of this cryocli version", path)
        return checkpoint

    # ----- results -----------------------------------------------------------------------------------
    def write_result(self, result: Reconstruction, table: Any, command: str,
                     truth_scores: dict[str, Any] | None = None) -> dict[str, str]:
        """Write the maps, ``particles.star`` (the particles the run used, input columns kept, poses, origins and
        the method's columns), ``model.star`` (refinement), ``fsc.star`` (half maps) and ``fsc.png``.

        Every map is checked first (finite, not all zero): a broken result writes nothing. Returns
        ``{kind: final path}`` of every file of the run.
        """
        from cryocli.analysis.fsc import shell_frequency, threshold_crossing
        from cryocli.geometry.rotations import matrix_to_euler
        from cryocli.io.mrc import write_map
        from cryocli.io.star import fsc_star_text, model_star_text, write_star
        from cryocli.plots import plot_fsc

        maps = {"map.mrc": result.volume}
        if result.unfiltered_volume is not None:
            maps["map_unfil.mrc"] = result.unfiltered_volume
        if result.half_volumes is not None:
            maps.update({"half1_unfil.mrc": result.half_volumes[0], "half2_unfil.mrc": result.half_volumes[1]})
        if result.regularised_half_volumes is not None:
            maps.update({"half1_regularised.mrc": result.regularised_half_volumes[0],
                         "half2_regularised.mrc": result.regularised_half_volumes[1]})
        arrays = {name: _checked_map(name, volume) for name, volume in maps.items()}
        written: dict[str, str] = {}
        vs, n = float(result.voxel_size), result.box
        for name, array in arrays.items():
            notes = result.map_filter.labels() if name == "map.mrc" and result.map_filter is not None else []
            write_map(self.file(name), array, vs, command, notes=notes)
        written["map"] = str(self.final_file("map.mrc"))
        if result.unfiltered_volume is not None:
            written["map_unfil"] = str(self.final_file("map_unfil.mrc"))
        if result.half_volumes is not None:
            written["half1"], written["half2"] = (str(self.final_file(f"half{i}_unfil.mrc")) for i in (1, 2))
        if result.regularised_half_volumes is not None:
            written["half1_regularised"], written["half2_regularised"] = (
                str(self.final_file(f"half{i}_regularised.mrc")) for i in (1, 2))
        rows = result.particle_rows if result.particle_rows is not None else np.arange(len(table))
        rot, tilt, psi = matrix_to_euler(result.rotations.detach().cpu().to(torch.float64))
        posed = table.subset(rows).with_poses(rot.numpy(), tilt.numpy(), psi.numpy(),
                                              result.origins_angstrom.detach().cpu().to(torch.float64).numpy(),
                                              extra_columns=result.particle_columns)
        write_star(posed, self.file("particles.star"))
        written["particles"] = str(self.final_file("particles.star"))
        if result.model_history:
            atomic_write_text(self.file("model.star"), model_star_text(
                result.model_history, n, vs, result.resolution_A, result.converged, command, result.group_scales))
            written["model"] = str(self.final_file("model.star"))
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        resolutions: dict[str, float] = {}
        gold = result.gold_standard_fsc
        if gold is not None:
            atomic_write_text(self.file("fsc.star"), fsc_star_text(np.asarray(gold), n, vs, command))
            written["fsc_star"] = str(self.final_file("fsc.star"))
            curves["half maps"] = (shell_frequency(n, vs), np.asarray(gold))
            resolutions["half maps (0.143)"] = threshold_crossing(np.asarray(gold), n, vs, 0.143).resolution
        if truth_scores is not None:
            curves["map vs ground truth"] = (truth_scores["frequency"], truth_scores["fsc"])
            resolutions["vs truth (0.5)"] = truth_scores["res_fsc05"]
        if curves:
            plot_fsc(self.file("fsc.png"), curves, resolutions=resolutions, title=command)
            written["fsc_plot"] = str(self.final_file("fsc.png"))
        thresholds = {"half maps": 0.143, "map vs ground truth": 0.5}
        if result.map_filter is not None and gold is None:
            label = "half sets at shared poses (sets map.mrc's filter; not independent)"
            curves[label] = (shell_frequency(n, vs), np.asarray(result.map_filter.fsc))
            thresholds[label] = 0.143
        diameter = result.map_filter.mask_diameter_A if result.map_filter is not None else None
        marks = {label: threshold_crossing(np.asarray(curve), n, vs, thresholds[label]).resolution
                 for label, (_, curve) in curves.items() if len(curve) == n // 2 + 1}
        report = self._write_report(command, arrays["map.mrc"], vs, curves, thresholds, marks,
                                    result.resolution_A, result.metrics, result.rotations, result.symmetry,
                                    diameter_A=diameter, epoch_label="iteration" if result.model_history else "epoch")
        written.update({k: str(self.final_file(Path(v).name)) for k, v in report.items()})
        written["metrics"] = str(self.final_file(METRICS))
        written["log"] = str(self.final_file(LOG))
        written["checkpoint"] = str(self.final_file(CHECKPOINT))
        return written


def check_writable_folder(path: Path) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: a path under a regular
    file, or a nearest existing ancestor that is not a writable folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CryocliError(f"cannot create the output: {probe} is a file, not a folder", path)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CryocliError(f"cannot write the output: {probe} is not writable", path)


def _checked_map(name: str, volume: Tensor) -> np.ndarray:
    """The map as float32 numpy, refused when it is not finite or all zero (the run diverged or is empty)."""
    array = np.asarray(torch.as_tensor(volume).detach().cpu(), dtype=np.float32)
    if not np.isfinite(array).all():
        raise CryocliError(f"the run's {name} is not finite (NaN or Inf): the run diverged; nothing was written "
                           "(lower the learning rate or the regularisation weights)")
    if not np.any(array):
        raise CryocliError(f"the run's {name} is all zero: nothing was written (check the particles and the "
                           "options that scale the map)")
    return array


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.ndarray, Tensor)):
        return np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value).tolist()
    if isinstance(value, Path):
        return str(value)
    return value
