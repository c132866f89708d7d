"""Class-conditional generation on top of ``sdt.engine``: the config, the diffusion task (loss and
validation loss), ``sdt gen-train``, and sampling (``sdt sample``).

    cfg = load_config(GenConfig, "gen-fashion-mnist", ["model.attn=fixed"])
    summary = train_generator(cfg, output_dir="runs/gen-fixed")
    model, cfg = load_generator("runs/gen-fixed")      # EMA weights of the newest checkpoint
    images = sample_images(model, cfg.model.objective, class_labels(10, 100), seed=0)

A run folder is an ``sdt train`` run folder (config.yaml, checkpoints/ with model and EMA weights
and the training state, metrics.jsonl, tb/, train.log, curves.png, summary.json, report.md, best.safetensors
= lowest validation loss) plus ``samples.png``: a row per class drawn with the final EMA weights.
The training loop, checkpoints, exact resume, progress bars and torchrun are the engine's.
"""
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from .checkpoints import CheckpointError, atomic_path, checkpoint_dirs, load_into, load_weights
from .config import ConfigError, load_config
from .data import (SEED_STRIDE, Batch, DataConfig, DataError, check_data_config, check_images, resolve_in_chans,
                   resolve_num_classes, split_datasets)
from .diffusion import OBJECTIVES, SAMPLERS, create_objective
from .engine import DistInfo, EngineConfig, RunParts, Trainer, all_reduce_sum, progress_bar, run_task
from .decay import DECAY_ALIASES, DECAY_VARIANTS, DecayVariantError, decay_variant
from .models.dit import DiT, create_dit
from .plots import save_image_grid

_logger = logging.getLogger("sdt")


@dataclass
class GenModelConfig:
    name: str = "dit_n_4"                # sdt.models.dit.list_dits()
    attn: str = "cag"                    # a sdt.decay.DECAY_VARIANTS name: "none" (plain DiT), "fixed" (RMT), "cag" (SDT), ...
    objective: str = "flow"              # "ddpm" (DiT: epsilon, linear betas, T=1000) or "flow" (SiT: velocity)
    learn_sigma: bool = False            # ddpm only: learned variance with the hybrid loss
    num_classes: Optional[int] = None    # None: the dataset's class count
    in_chans: Optional[int] = None       # None: the dataset's channel count
    kwargs: Dict[str, Any] = field(default_factory=dict)  # more create_dit arguments (hidden_size, depth, ...)


@dataclass
class GenAugConfig:
    hflip: float = 0.5                   # random horizontal flip probability


@dataclass
class SampleConfig:
    """How ``sdt sample`` (and the preview at the end of training) draws samples by default."""
    sampler: Optional[str] = None        # ddim | ddpm (ddpm objective), heun | euler (flow); None: the first
    steps: int = 50
    cfg_scale: float = 1.0               # classifier-free guidance (1: none)
    preview_per_class: int = 10          # samples.png at the end of training (0: none)


@dataclass
class GenConfig:
    model: GenModelConfig = field(default_factory=GenModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(val_size=1000))
    aug: GenAugConfig = field(default_factory=GenAugConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-4, lr_base_size=256, weight_decay=0.0,
                                                                      warmup_epochs=0.0, sched="constant", ema_decay=0.9999))
    sample: SampleConfig = field(default_factory=SampleConfig)


def images_to_model(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def model_to_images(x: Tensor) -> Tensor:
    """float in [-1, 1] (B, C, H, W) -> uint8, rounded and clipped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generation_transform(data: DataConfig, hflip: float, training: bool) -> Any:
    """PIL image -> (C, input_size, input_size) float in [-1, 1]: resize the short side to
    ``input_size / crop_pct`` with ``data.interpolation``, centre crop, random horizontal flip when ``training``."""
    from torchvision import transforms

    size = data.input_size
    steps = [transforms.Resize(int(round(size / data.crop_pct)), interpolation=transforms.InterpolationMode(data.interpolation)),
             transforms.CenterCrop(size)]
    if training and hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    steps += [transforms.PILToTensor(), transforms.Lambda(images_to_model)]
    return transforms.Compose(steps)


def check_gen_config(cfg: GenConfig) -> None:
    """Config values that cannot work, as a ``ConfigError`` / ``DataError`` naming the key."""
    if not 0 <= cfg.aug.hflip <= 1:
        raise ConfigError(f"aug.hflip must be a probability in [0, 1], got {cfg.aug.hflip}")
    try:
        decay_variant(cfg.model.attn)
    except DecayVariantError:
        aliases = "".join(f"; {alias!r} is read as {name!r}" for alias, name in DECAY_ALIASES.items())
        raise ConfigError(f"model.attn must be one of {tuple(DECAY_VARIANTS)} (sdt.decay.DECAY_VARIANTS{aliases}), "
                          f"got {cfg.model.attn!r}") from None
    if cfg.model.objective not in OBJECTIVES:
        raise ConfigError(f"model.objective must be one of {OBJECTIVES}, got {cfg.model.objective!r}")
    if cfg.model.learn_sigma and cfg.model.objective != "ddpm":
        raise ConfigError("model.learn_sigma=true needs model.objective=ddpm (flow matching predicts a velocity only)")
    if cfg.sample.sampler is not None and cfg.sample.sampler not in SAMPLERS[cfg.model.objective]:
        raise ConfigError(f"sample.sampler={cfg.sample.sampler!r} does not fit model.objective={cfg.model.objective}; "
                          f"choose one of {SAMPLERS[cfg.model.objective]}")
    interpolations = tuple(mode.value for mode in InterpolationMode)  # torchvision's, not timm's (no "random")
    if cfg.data.interpolation not in interpolations:
        raise ConfigError(f"data.interpolation must be one of {interpolations}, got {cfg.data.interpolation!r}")
    if not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct must be in (0, 1] (resize to input_size / crop_pct, centre crop), got {cfg.data.crop_pct}")
    check_data_config(cfg.data)  # the rest of the data section, as sdt train checks it
    if cfg.data.test_subset is not None:
        raise ConfigError("data.test_subset has no effect: gen-train uses the train and val splits only; "
                          "drop it (limit the data with data.train_subset / data.val_subset)")
    try:
        check_sampling(cfg.sample.steps, cfg.sample.cfg_scale, cfg.model.objective)
    except ConfigError as e:
        raise ConfigError(f"sample.{e}") from e
    if cfg.sample.preview_per_class < 0:
        raise ConfigError(f"sample.preview_per_class must be >= 0 (0: no samples.png), got {cfg.sample.preview_per_class}")


def check_sampling(num_steps: int, cfg_scale: float, objective_name: str, batch_size: int = 1) -> None:
    """Sampling settings that cannot work, as a ``ConfigError`` naming the setting (``sample_images`` checks them)."""
    max_steps = 1000 if objective_name == "ddpm" else math.inf  # DDPM respaces its T = 1000 training steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= max_steps:
        raise ConfigError(f"steps must be an integer from 1 to {max_steps} for the {objective_name} objective, got {num_steps!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be a finite number >= 0 (1: no guidance), got {cfg_scale}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def build_model(cfg: GenModelConfig, input_size: int) -> DiT:
    """The DiT of a run config (num_classes and in_chans resolved)."""
    try:
        return create_dit(cfg.name, attn=cfg.attn, learn_sigma=cfg.learn_sigma, num_classes=cfg.num_classes,
                          in_channels=cfg.in_chans, input_size=input_size, **cfg.kwargs)
    except ValueError as e:  # unknown name, or an image side the patch size does not divide
        raise ConfigError(f"model: {e}") from e


class DiffusionTask:
    """The objective's training loss; validation: the same loss at fixed (seeded) timesteps and noise,
    so that evaluations are comparable across epochs (lower is better)."""
    metric = "loss"
    higher_is_better = False

    def __init__(self, objective_name: str, learn_sigma: bool, seed: int):
        self.objective = create_objective(objective_name, learn_sigma)
        self.seed = seed

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        # timesteps, noise and label dropout draw from the loop's RNG, which checkpoints save
        return self.objective.training_losses(model, batch.images, batch.targets)["loss"].mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=dist_info.device)
        for index, batch in enumerate(loader):
            if len(batch.images) == 0:
                continue
            generator = torch.Generator(dist_info.device).manual_seed(self.seed * SEED_STRIDE + index * dist_info.world_size + dist_info.rank)
            images, labels = batch.images.to(dist_info.device), batch.targets.to(dist_info.device)
            losses = self.objective.training_losses(model, images, labels, generator)["loss"]
            sums += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64, device=dist_info.device)])
        all_reduce_sum(sums, dist_info)
        model.train(was_training)
        return {"loss": (sums[0] / sums[1].clamp(min=1)).item()}


def train_generator(cfg: Optional[GenConfig] = None, output_dir: Optional[str] = None,
                    resume: Optional[str] = None) -> Dict[str, Any]:
    """Train a class-conditional DiT as ``cfg`` says; ``resume`` as in ``sdt.train.train``.

    Returns the run summary (also summary.json / report.md): steps, images/s, best and final
    validation loss, parameters, MACs.
    """
    return run_task(GenConfig, cfg, output_dir, resume, lambda c: f"{c.model.name}-{c.model.attn}", build_generation)


def build_generation(cfg: GenConfig, info: DistInfo) -> RunParts:
    """``run_task``'s builder for ``sdt gen-train``: every check of the config, data and model (nothing
    is written), the DiT, the diffusion task and the datasets, and samples.png at the end."""
    check_gen_config(cfg)
    cfg.model.in_chans = channels = resolve_in_chans(cfg)
    size = cfg.data.input_size
    datasets = split_datasets(cfg.data, ("train", "val"), channels,
                              lambda training: generation_transform(cfg.data, cfg.aug.hflip, training), cfg.engine.seed)
    cfg.model.num_classes = resolve_num_classes(cfg, datasets["train"].classes)
    torch.manual_seed(cfg.engine.seed)
    model = build_model(cfg.model, size)
    for ds in datasets.values():
        check_images(ds, channels, cfg.model.num_classes, model.patch_size)
    task = DiffusionTask(cfg.model.objective, cfg.model.learn_sigma, cfg.engine.seed)

    def finish(trainer: Trainer, summary: Dict[str, Any]) -> None:
        """samples.png: a row per class, drawn with the final EMA weights (main process)."""
        if not (info.is_main and cfg.sample.preview_per_class):
            return
        sampling_model = (trainer.ema.module if trainer.ema is not None else trainer.model).eval()
        labels = class_labels(cfg.model.num_classes, cfg.sample.preview_per_class)
        images = sample_images(sampling_model, cfg.model.objective, labels.to(info.device), seed=0,
                               sampler=cfg.sample.sampler, num_steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale)
        save_samples(images, labels, str(trainer.output_dir / "samples"), grid_per_class=cfg.sample.preview_per_class,
                     npz=False)

    def headline(s: Dict[str, Any]) -> str:
        return (f"{s['global_step']} steps, {s['train_images_per_s']:.0f} training images/s, "
                f"final val loss {s['final_val']['loss']:.4f}")

    preview = ("![samples](samples.png) (EMA weights, a row per class)",) if cfg.sample.preview_per_class else ()
    return RunParts(
        model, task, datasets["train"], datasets["val"],
        f"{cfg.model.name} (attn {cfg.model.attn}, {cfg.model.objective} objective)", (channels, size, size),
        summary=dict(model=cfg.model.name, attn=cfg.model.attn, objective=cfg.model.objective),
        report_title="Generation training report", report_rows=lambda s: report_rows(s, cfg), headline=headline,
        flops_inputs=(torch.zeros(1), torch.zeros(1, dtype=torch.long)), finish=finish, figures=preview)


def report_rows(s: Dict[str, Any], cfg: GenConfig) -> List[Tuple[str, str]]:
    """The rows of a generation run's report.md."""
    final = s["final_val"]
    return [
        ("model", f"`{s['model']}`, attn `{s['attn']}`, {s['objective']} objective ({s['params'] / 1e6:.2f}M parameters, "
                  f"{s['flops'] / 1e6:.1f} MMACs at {s['input_size']}x{s['input_size']})"),
        ("data", f"{cfg.data.dataset} {cfg.data.data_dir or ''}".strip()),
        ("epochs / steps / global batch / processes", f"{cfg.engine.epochs} / {s['global_step']} / {cfg.engine.batch_size} / {s['processes']}"),
        ("final val loss (model / EMA)", f"{final['loss']:.4f} / {final.get('ema_loss', float('nan')):.4f}"),
        ("best val loss", f"{s['best']['value']:.4f} (epoch {s['best']['epoch']}, {s['best']['source']} weights)"),
        ("wall time (this segment)", f"{s['wall_seconds'] / 60:.1f} min"),
        ("training throughput", f"{s['train_images_per_s']:.0f} images/s"),
    ]


def load_generator(run_dir: str, weights: str = "ema") -> Tuple[DiT, GenConfig]:
    """Rebuild a trained model from a run folder. ``weights``: "ema" (default; DiT samples with EMA) or
    "model" from the newest checkpoint, or "best" (lowest validation loss)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a generation run (no config.yaml); give the --output of 'sdt gen-train'")
    try:
        cfg = load_config(GenConfig, str(run / "config.yaml"))
    except ConfigError as e:
        raise ConfigError(f"{run_dir} is not a generation run of 'sdt gen-train' ({e})") from e
    if weights not in ("ema", "model", "best"):
        raise ConfigError(f"weights must be 'ema', 'model' or 'best', got {weights!r}")
    if weights == "best":
        path = run / "best.safetensors"
    else:
        found = checkpoint_dirs(run)
        if not found:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (checkpoints/ is empty); use --weights best, or train longer")
        path = found[-1] / f"{weights}.safetensors"
        if weights == "ema" and not path.is_file():
            raise CheckpointError(f"{path} does not exist: the run trained without EMA (engine.ema_decay); use --weights model")
    model = build_model(cfg.model, cfg.data.input_size)
    load_into(model, load_weights(path), path)
    return model.eval(), cfg


UNCONDITIONAL = -1  # the label of an unconditional sample (the null class of a model trained with label dropout)


def _model_labels(model: DiT, labels: Tensor) -> Tensor:
    """Checked sampling labels (N,): class indices in [0, num_classes), or ``UNCONDITIONAL`` -> the null class."""
    has_null = model.y_embedder.dropout_prob > 0
    allowed = f"class indices 0..{model.num_classes - 1}" + (" or sdt.generate.UNCONDITIONAL (-1)" if has_null else "")
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
