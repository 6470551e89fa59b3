"""What is in a file: the facts `cryocli info` reports, as plain dictionaries (JSON-ready).

Units: pixel sizes in Angstrom, voltage in kV, Cs in mm, defocus in Angstrom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryocli.errors import CryocliError
from cryocli.io.mrc import open_stack, stack_info

CTF_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
STAR_SUFFIXES = {".star"}
MRC_SUFFIXES = {".mrc", ".mrcs", ".map", ".st", ".ali"}


def file_kind(path: str | Path) -> str:
    """``"star"`` or ``"mrc"`` from the file name; CryocliError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in STAR_SUFFIXES:
        return "star"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise CryocliError("unknown file type (expected .star, .mrc, .mrcs or .map)", path)


def _range(values: np.ndarray) -> list[float] | None:
    return [float(np.min(values)), float(np.max(values))] if len(values) else None


def summarize_star(path: str | Path, datadir: str | Path | None = None) -> dict[str, Any]:
    """Particle count, optics groups, columns present, STAR version and whether every stack exists."""
    from cryocli.io.dataset import resolve_stack_paths
    from cryocli.io.star import read_star

    table = read_star(path)
    parts = table.particles
    merged = table.optics_per_particle()
    groups = []
    pixel = table.pixel_size if table.has_pixel_size else None
    group_col = "rlnOpticsGroup" if "rlnOpticsGroup" in merged.columns else None
    keys = merged[group_col].unique() if group_col else [None]
    for key in keys:
        rows = merged[merged[group_col] == key] if group_col else merged

        def first(col: str) -> Any:
            if col not in rows.columns:
                return None
            value = rows[col].iloc[0]
            return value.item() if hasattr(value, "item") else value

        defocus = None
        if "rlnDefocusU" in rows.columns and "rlnDefocusV" in rows.columns:
            defocus = _range(np.concatenate([rows["rlnDefocusU"].to_numpy(float), rows["rlnDefocusV"].to_numpy(float)]))
        groups.append({
            "group": None if key is None else (key.item() if hasattr(key, "item") else key),
            "name": first("rlnOpticsGroupName"),
            "particles": int(len(rows)),
            "box": first("rlnImageSize"),
            "pixel_size": float(pixel[rows.index.to_numpy()][0]) if pixel is not None and len(rows) else None,
            "voltage": first("rlnVoltage"),
            "cs": first("rlnSphericalAberration"),
            "amplitude_contrast": first("rlnAmplitudeContrast"),
            "defocus_range": defocus,
        })
    has_images = "rlnImageName" in parts.columns
    stacks = resolve_stack_paths(table, datadir=datadir) if has_images else []
    missing = [s["name"] for s in stacks if s["resolved"] is None]
    boxes = sorted({stack_info(s["resolved"]).box for s in stacks if s["resolved"] is not None})
    return {
        "file": str(path),
        "type": "star",
        "star_version": table.version,
        "particles": int(len(parts)),
        "optics_groups": groups,
        "columns": list(parts.columns),
        "has_poses": table.has_poses,
        "has_shifts": table.has_shifts,
        "has_half_sets": "rlnRandomSubset" in parts.columns,
        # Usable for CTF correction: defocus per particle and the optics values the formula needs.
        "has_ctf": table.has_ctf and all(c in merged.columns for c in CTF_OPTICS_COLUMNS),
        "has_images": has_images,
        "stacks": len(stacks),
        "stacks_missing": missing,
        "all_stacks_exist": not missing,
        "stack_boxes": boxes,
    }


def summarize_mrc(path: str | Path) -> dict[str, Any]:
    """Grid shape, voxel size, mode, axis order and value statistics of an MRC map or stack."""
    with open_stack(path) as mrc:
        header = mrc.header
        shape = tuple(int(s) for s in mrc.data.shape)
        order = (int(header.mapc), int(header.mapr), int(header.maps))
        is_stack = bool(mrc.is_image_stack()) or Path(path).suffix.lower() == ".mrcs"
        data = np.asarray(mrc.data, dtype=np.float64)
        stats = {"min": float(data.min()), "max": float(data.max()), "mean": float(data.mean()),
                 "std": float(data.std())}
        voxel = float(mrc.voxel_size.x)
        mode = int(header.mode)
        label = header.label[0].decode("ascii", "replace").strip() if int(header.nlabl) > 0 else ""
    summary: dict[str, Any] = {
        "file": str(path), "type": "stack" if is_stack else "map", "shape_xyz": list(shape[::-1]),
        "voxel_size": voxel, "mode": mode, "axis_order": list(order), "label": label, **stats,
        "finite": bool(np.isfinite(stats["min"]) and np.isfinite(stats["max"])),
    }
    if is_stack:
        summary["images"] = 1 if len(shape) == 2 else shape[0]
    return summary


def summarize(path: str | Path, datadir: str | Path | None = None) -> dict[str, Any]:
    """Dispatch on the file type."""
    if not Path(path).exists():
        raise CryocliError("file not found", path)
    return summarize_star(path, datadir) if file_kind(path) == "star" else summarize_mrc(path)
