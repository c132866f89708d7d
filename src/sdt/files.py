"""Weights files and atomic writes: the one place sdt reads weights and writes files.

    save_weights(path, model.state_dict())            # safetensors, atomically
    load_into(model, load_weights(path), path)         # .safetensors or a torch file, checked, strict

- Every file is written atomically (``atomic_path`` / ``atomic_write``): into a temp name in the
  target folder, fsynced, renamed over the target, and the folder fsynced, so a reader (or a
  crash) sees the old file or the new one, never a partial one.
- Weights are read without running code: safetensors, or ``torch.load(weights_only=True)``.
  Anything that is not a state dict of tensors (a truncated file, another format, a pickle
  with objects) is a ``CheckpointError`` that names the file and the fix.

Training checkpoints (``checkpoints/step-N`` folders) are the engine's: ``sdt.engine.checkpoints``.
"""
import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# Atomic writes


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temp path next to ``path`` (same suffix, so writers that infer the format from it work);
    when the block succeeds the temp file is fsynced and renamed over ``path``; when it fails the
    temp file is removed and ``path`` is untouched.

        with atomic_path("model.onnx") as tmp:
            torch.onnx.export(model, x, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically: readers see the old content or the new."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# ---------------------------------------------------------------------------------------------
# Weights


def save_weights(path: PathLike, state_dict: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors (on the CPU, contiguous), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: PathLike) -> Dict[str, Tensor]:
    """The state dict in a weights file, on the CPU, without running any code from it.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (``argparse.Namespace``, which RMT's released checkpoints
    hold, is allowed). A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
    Raises ``CheckpointError`` for a missing, truncated or foreign file and for non-tensor entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated, or not a weights file?): {e}. "
                                  f"Copy or download it again, or pass the model.safetensors / best.safetensors of a run") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad or unsafe files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, not a state dict, or it holds "
                              f"objects that loading would have to execute): {e}. Save weights with "
                              f"torch.save(model.state_dict(), ...) or as .safetensors") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} is not a state dict: {len(not_tensors)} entries are not tensors "
                              f"(e.g. {not_tensors[:3]}); save model.state_dict() only")
    return state


def load_into(model: nn.Module, state_dict: Dict[str, Tensor], path: PathLike) -> None:
    """Load weights strictly; a mismatch names the file and the first missing, unexpected and
    wrongly shaped keys (``CheckpointError``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{path} does not fit this model ({type(model).__name__}): {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong_shape)} shape mismatches "
            f"(file vs model) {wrong_shape[:3]}. Was it trained with another model, num_classes or in_chans?")
    model.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------
# Hub folders: timm's Hugging Face layout (written by sdt.tools.hub.export_run_to_hub)


def is_hub_dir(path: PathLike) -> bool:
    """Whether ``path`` is a folder in timm's hub layout (config.json beside model.safetensors)."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_hub_model(path: PathLike) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model of a hub folder with its weights, and the timm data config of its preprocessing
    (``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``; pass it to
    ``timm.data.create_transform``). The model's ``pretrained_cfg["label_names"]`` names its classes."""
    if not is_hub_dir(path):
        raise CheckpointError(f"{path} is not a hub folder (it needs config.json and model.safetensors); "
                              f"make one with `sdt.tools.hub.export_run_to_hub(run, folder)`")
    model = timm.create_model(f"local-dir:{Path(path)}", pretrained=True).eval()
    return model, timm.data.resolve_data_config(model=model)
