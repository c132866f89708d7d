"""Training checkpoints: a folder ``checkpoints/step-N`` (model.safetensors, ema.safetensors,
state.pt) written as a whole: a temp folder ``.tmp-step-N-<pid>``, then one rename. The training
state is read with ``weights_only=True``; weights go through ``sdt.files``.
"""
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import PathLike, atomic_path, fsync_dir, save_weights

STATE_FORMAT = "sdt.engine.train_state/1"
TEMP_CHECKPOINT_PREFIX = ".tmp-step-"


def checkpoint_dirs(output_dir: PathLike) -> List[Path]:
    """Complete step checkpoints of a run, oldest first (temp folders of a killed save are ignored)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def find_last_checkpoint(output_dir: PathLike) -> Path:
    found = checkpoint_dirs(output_dir)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from in {Path(output_dir) / 'checkpoints'}; "
                              f"start a new run (without --resume) or pass --output of an earlier run")
    return found[-1]


def write_checkpoint(output_dir: PathLike, step: int, weights: Dict[str, Dict[str, Tensor]], state: Dict[str, Any],
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``checkpoints/step-<step>`` as a whole: ``weights`` (file stem -> state dict) as
    safetensors and ``state`` as state.pt, into a temp folder that is renamed when complete.
    An existing ``step-<step>`` is kept as it is. Returns the folder."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists():
        return final
    tmp = root / f"{TEMP_CHECKPOINT_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, state_dict in weights.items():
        save_weights(tmp / f"{stem}.safetensors", state_dict, metadata)
    with atomic_path(tmp / "state.pt") as state_tmp:
        torch.save({"format": STATE_FORMAT, **state}, state_tmp)
    os.rename(tmp, final)
    fsync_dir(root)
    return final


def prune_checkpoints(output_dir: PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` (at least 1) step checkpoints."""
    for old in checkpoint_dirs(output_dir)[:-max(keep, 1)]:
        shutil.rmtree(old)


def remove_temp_checkpoints(output_dir: PathLike) -> List[Path]:
    """Delete the temp folders that saves killed mid-way left behind; returns them. Call it only
    while holding the run's lock (``sdt.engine.run.lock_run_folder``), so no live save is removed."""
    root = Path(output_dir) / "checkpoints"
    orphans = sorted(root.glob(TEMP_CHECKPOINT_PREFIX + "*")) if root.is_dir() else []
    for tmp in orphans:
        shutil.rmtree(tmp, ignore_errors=True)
    return orphans


def load_train_state(ckpt_dir: PathLike) -> Dict[str, Any]:
    """The training state of a checkpoint folder, loaded with ``weights_only=True`` (no pickled code runs)."""
    path = Path(ckpt_dir) / "state.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint folder: {path.name} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise CheckpointError(f"cannot load training state {path} (truncated, or not written by sdt?): {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not an sdt training state (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                              f"expected {STATE_FORMAT!r})")
    return state
