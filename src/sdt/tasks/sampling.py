"""Sampling a trained generator: class-conditional images from noise, with classifier-free guidance,
the label list of a grid, and the files ``sdt sample`` writes.

    images = sample_images(model, "flow", class_labels(10, 100), seed=0)    # uint8 (N, C, H, W)
    save_samples(images, labels, "out/samples")                             # .npz + a PNG grid
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import SEED_STRIDE
from ..engine import progress_bar
from ..engine.plots import save_image_grid
from ..errors import ConfigError, DataError
from ..files import atomic_path
from ..models.dit import DiT
from .diffusion import SAMPLERS, create_objective


def model_to_images(x: Tensor) -> Tensor:
    """float in [-1, 1] (B, C, H, W) -> uint8, rounded and clipped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_sampling(num_steps: int, cfg_scale: float, objective_name: str, batch_size: int = 1) -> None:
    """Sampling settings that cannot work, as a ``ConfigError`` naming the setting (``sample_images`` checks them)."""
    max_steps = 1000 if objective_name == "ddpm" else math.inf  # DDPM respaces its T = 1000 training steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= max_steps:
        raise ConfigError(f"steps must be an integer from 1 to {max_steps} for the {objective_name} objective, got {num_steps!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be a finite number >= 0 (1: no guidance), got {cfg_scale}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


UNCONDITIONAL = -1  # the label of an unconditional sample (the null class of a model trained with label dropout)


def _model_labels(model: DiT, labels: Tensor) -> Tensor:
    """Checked sampling labels (N,): class indices in [0, num_classes), or ``UNCONDITIONAL`` -> the null class."""
    has_null = model.y_embedder.dropout_prob > 0
    allowed = f"class indices 0..{model.num_classes - 1}" + (" or sdt.tasks.sampling.UNCONDITIONAL (-1)" if has_null else "")
    if labels.ndim != 1 or len(labels) == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"labels must be a non-empty 1-D integer tensor of {allowed}, got {labels.dtype} {tuple(labels.shape)}")
    bad = labels[(labels >= model.num_classes) | ((labels < 0) & (labels != UNCONDITIONAL))]
    if len(bad):
        raise DataError(f"labels must be {allowed}; got {bad.unique()[:5].tolist()}")
    unconditional = labels == UNCONDITIONAL
    if unconditional.any() and not has_null:
        raise DataError("this model was trained without label dropout (class_dropout_prob=0), so it has no null class "
                         "and cannot sample unconditionally; give class labels")
    return torch.where(unconditional, model.num_classes, labels.long())


@torch.no_grad()
def sample_images(model: DiT, objective_name: str, labels: Tensor, seed: int = 0, sampler: Optional[str] = None,
                  num_steps: int = 50, cfg_scale: float = 1.0, image_size: Optional[Tuple[int, int]] = None,
                  batch_size: int = 250, progress: bool = False) -> Tensor:
    """Class-conditional samples, uint8 (N, C, H, W), one per label; the same seed gives the same images.

    ``labels`` (N,): class indices in [0, num_classes), or ``UNCONDITIONAL`` for an unconditional sample
    (models trained with label dropout). cfg_scale 1 is plain conditional sampling; otherwise classifier-free
    guidance. The starting noise of sample i depends only on (seed, i), so the deterministic samplers (ddim,
    heun, euler) give the same images for any ``batch_size``; the ancestral ddpm sampler's per-step noise
    depends on the batching too. ``progress`` shows a progress bar (images/s, ETA) on stderr.
    """
    check_sampling(num_steps, cfg_scale, objective_name, batch_size)
    labels = _model_labels(model, labels)
    objective = create_objective(objective_name, model.learn_sigma)
    sampler = sampler or SAMPLERS[objective_name][0]
    if sampler not in SAMPLERS[objective_name]:
        raise ConfigError(f"sampler {sampler!r} does not fit the {objective_name} objective; choose one of {SAMPLERS[objective_name]}")
    height, width = image_size or (model.x_embedder.img_size or (28, 28))
    if cfg_scale == 1.0:
        model_fn = model
    elif model.y_embedder.dropout_prob <= 0:
        raise ConfigError("classifier-free guidance (cfg_scale != 1) needs a model trained with label dropout "
                         "(class_dropout_prob > 0); use cfg_scale 1")
    else:
        def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return model.forward_with_cfg(x, t, y, cfg_scale)
    device = next(model.parameters()).device
    all_noise = torch.randn(len(labels), model.in_channels, height, width, generator=torch.Generator().manual_seed(seed))
    out = []
    bar = progress_bar(len(labels), "sampling", progress)
    for first in range(0, len(labels), batch_size):
        y = labels[first:first + batch_size].to(device)
        noise = all_noise[first:first + batch_size].to(device)
        generator = torch.Generator(device).manual_seed(seed * SEED_STRIDE + first)  # ddpm's per-step noise
        samples = objective.sample(model_fn, noise, y, sampler, num_steps, generator, clip_denoised=True)  # pixels in [-1, 1]
        out.append(model_to_images(samples).cpu())
        bar.update(len(y))
    bar.close()
    return torch.cat(out)


def class_labels(num_classes: int, per_class: int, classes: Optional[Sequence[int]] = None) -> Tensor:
    """[c0]*per_class + [c1]*per_class + ... for ``classes`` (default: all of 0..num_classes-1): (len * per_class,)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class (samples per class) must be a positive integer, got {per_class!r}")
    chosen = list(range(num_classes)) if classes is None else list(classes)
    if not chosen:
        raise ConfigError("no classes given")
    bad = [c for c in chosen if not (c == UNCONDITIONAL or 0 <= c < num_classes)]
    if bad:
        raise ConfigError(f"classes must be in 0..{num_classes - 1} (or {UNCONDITIONAL}: unconditional), got {bad}")
    return torch.tensor(chosen, dtype=torch.long).repeat_interleave(per_class)


def save_samples(images: Tensor, labels: Tensor, out_prefix: str, grid_per_class: int = 10,
                 npz: bool = True) -> Dict[str, str]:
    """Write ``<prefix>.npz`` (arr_0: uint8 (N, H, W, C) as DiT's evaluator reads, labels: (N,); unless
    ``npz=False``) and ``<prefix>.png`` (a row per class, the first ``grid_per_class`` samples of each).
    Returns the paths written."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    images, labels = images.cpu(), labels.cpu()
    paths = {"png": out_prefix + ".png"}
    if npz:
        paths["npz"] = out_prefix + ".npz"
        with atomic_path(paths["npz"]) as tmp:
            np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    classes = labels.unique()
    save_image_grid(torch.cat([images[labels == c][:grid_per_class] for c in classes]), len(classes), paths["png"])
    return paths
