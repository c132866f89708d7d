"""Weights a model starts from: where a weights source points, and loading it into a model whose head
or input channels may differ (fine-tuning), the way timm's ``load_pretrained`` adapts them.

    path = weights_file("runs/fmnist")                  # a run's best, a hub folder's, a tag's shipped file
    note = load_initial_checkpoint(model, "sdt_h_nano.fmnist_e30")   # "reset the head: ..." or "loaded ..."

A source is a weights file (ours in safetensors, or a torch file read with ``weights_only=True``; RMT's
released checkpoints are converted by ``sdt.models.checkpoint_filter_fn``), a run folder (its
best.safetensors), a checkpoint folder (its model.safetensors), a hub folder (``sdt export-hub``: its
model.safetensors) or a shipped pretrained tag such as ``sdt_h_nano.fmnist_e30``.
"""
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
from timm.models import adapt_input_conv
from torch import Tensor, nn

from ..errors import CheckpointError
from ..files import load_into, load_weights


def shipped_weights(name: str) -> Optional[Path]:
    """The local file of a pretrained tag (``sdt_h_nano.fmnist_e30``) when sdt ships its weights, else None."""
    if "." not in name or "/" in name or Path(name).exists():
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.file or not Path(cfg.file).is_file():
        return None
    return Path(cfg.file)


def weights_file(source: str) -> Path:
    """The weights file a source points at (see the module docstring); a ``CheckpointError`` naming
    what was expected when it points at nothing usable."""
    shipped = shipped_weights(source)
    if shipped is not None:
        return shipped
    path = Path(source)
    if path.is_dir():
        for name in ("best.safetensors", "model.safetensors"):  # a run folder; a hub or checkpoint folder
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no weights: expected best.safetensors (a finished run), or "
                              f"model.safetensors (a hub folder or a checkpoint folder)")
    if not path.is_file():
        raise CheckpointError(f"{source} is neither a weights file, a run/hub/checkpoint folder nor a shipped "
                              f"pretrained tag (e.g. sdt_h_nano.fmnist_e30; `sdt models` lists the models)")
    return path


def read_weights_for(model: nn.Module, path: Path) -> Dict[str, Tensor]:
    """The state dict of ``path`` in ``model``'s key names: RMT's released checkpoints go through
    ``checkpoint_filter_fn`` for SDT-H/RMT models (gates absent from them start at RMT's decay)."""
    from ..models.sdt_h import SpatialDecayTransformer, checkpoint_filter_fn

    state = load_weights(path)
    if isinstance(model, SpatialDecayTransformer):
        try:
            state = checkpoint_filter_fn(state, model)
        except ValueError as e:  # RMT decay buffers that do not match the model's config
            raise CheckpointError(f"{path} does not fit this model: {e}") from e
    return state


def _names(model: nn.Module, key: str) -> List[str]:
    """The module names the model's pretrained cfg gives for ``first_conv`` or ``classifier``."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get(key) or ()
    return [names] if isinstance(names, str) else list(names)


def head_and_channels(model: nn.Module, state: Dict[str, Tensor]) -> Tuple[Optional[int], Optional[int]]:
    """The classes of the head and the input channels of the stem that ``state`` was trained with
    (None where the file lacks that layer), found under the model's ``classifier`` / ``first_conv`` names."""
    heads = [state[f"{n}.weight"] for n in _names(model, "classifier") if f"{n}.weight" in state]
    stems = [state[f"{n}.weight"] for n in _names(model, "first_conv") if f"{n}.weight" in state]
    return (heads[0].shape[0] if heads else None), (stems[0].shape[1] if stems and stems[0].ndim == 4 else None)


def load_initial_checkpoint(model: nn.Module, source: str) -> str:
    """Load the weights of ``source`` into ``model`` to fine-tune it; returns one line saying what was done.

    A head with other classes than the model's is reset (the model keeps its fresh head); a stem with
    other input channels is adapted with timm's ``adapt_input_conv`` (RGB to grey sums the filters, grey
    to RGB repeats them, as timm does for pretrained weights). Every other tensor must fit exactly
    (``CheckpointError`` otherwise, naming the keys)."""
    path = weights_file(source)
    state = dict(read_weights_for(model, path))
    own = model.state_dict()
    changes = []
    for name in _names(model, "classifier"):
        keys = [k for k in (f"{name}.weight", f"{name}.bias") if k in own]
        if any(k in state and state[k].shape != own[k].shape for k in keys):
            changes.append(f"reset the head {name} ({state[keys[0]].shape[0]} classes in the file, "
                           f"{own[keys[0]].shape[0]} in the model)")
            state.update({k: own[k] for k in keys})
    for name in _names(model, "first_conv"):
        key = f"{name}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            changes.append(f"adapted the stem {name} from {state[key].shape[1]} to {own[key].shape[1]} input "
                           f"channels (timm adapt_input_conv)")
            state[key] = adapt_input_conv(own[key].shape[1], state[key], base_chans=state[key].shape[1]).to(own[key].dtype)
    load_into(model, state, path)
    where = f"{source} ({path})" if str(path) != source else source
    return f"initial weights from {where}: " + ("; ".join(changes) if changes else "every tensor loaded as it is")


def model_from_weights(arch: str, source: str) -> nn.Module:
    """``timm.create_model(arch)`` with the weights of ``source``, its head and input channels taken from
    the file (so a 10-class grey model's weights load whole). RMT's released checkpoints work too."""
    path = weights_file(source)
    model = timm.create_model(arch)
    state = read_weights_for(model, path)
    num_classes, in_chans = head_and_channels(model, state)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans))
              if v is not None and v != getattr(model, k, None)}
    if kwargs:
        model = timm.create_model(arch, **kwargs)
    load_into(model, state, path)
    return model
