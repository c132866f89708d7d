"""Class-conditional generation: the config, the diffusion task (the objective's loss; validation: the
same loss at seeded timesteps and noise), ``sdt gen-train``, and loading a trained generator.

    cfg = load_config(GenConfig, "gen-fashion-mnist", ["model.decay=fixed"])
    summary = Generate().train(cfg, output_dir="runs/gen-fixed")
    model, cfg = load_generator("runs/gen-fixed")      # EMA weights of the newest checkpoint
    images = sample_images(model, cfg.model.objective, class_labels(10, 100), seed=0)   # sdt.tasks.sampling

A run folder is an ``sdt train`` run folder (config.yaml, checkpoints/ with model and EMA weights
and the training state, metrics.jsonl, tb/, train.log, curves.png, summary.json, report.md, best.safetensors
= lowest validation loss) plus ``samples.png``: a row per class drawn with the final EMA weights.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from ..data import (SEED_STRIDE, Batch, DataConfig, check_data_config, check_images, resolve_in_chans, resolve_num_classes,
                    split_datasets)
from ..decay import DECAY_ALIASES, DECAY_VARIANTS, DecayVariantError, decay_variant
from ..engine import Built, DistInfo, EngineConfig, Trainer, all_reduce_sum, load_config
from ..engine.checkpoints import checkpoint_dirs
from ..errors import CheckpointError, ConfigError
from ..files import load_into, load_weights
from ..models.dit import DiT, create_dit
from .base import Rows, Task
from .diffusion import OBJECTIVES, SAMPLERS, create_objective
from .sampling import check_sampling, class_labels, sample_images, save_samples


@dataclass
class GenModelConfig:
    RENAMED_KEYS = {"attn": "decay"}     # runs and recipes from before decay was spelt as in the backbones
    name: str = "dit_n_4"                # sdt.models.dit.list_dits()
    decay: str = "cag"                   # a sdt.decay.DECAY_VARIANTS name: "none" (plain DiT), "fixed" (RMT), "cag" (SDT), ...
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
        decay_variant(cfg.model.decay)
    except DecayVariantError:
        aliases = "".join(f"; {alias!r} is read as {name!r}" for alias, name in DECAY_ALIASES.items())
        raise ConfigError(f"model.decay must be one of {tuple(DECAY_VARIANTS)} (sdt.decay.DECAY_VARIANTS{aliases}), "
                          f"got {cfg.model.decay!r}") from None
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


def build_model(cfg: GenModelConfig, input_size: int) -> DiT:
    """The DiT of a run config (num_classes and in_chans resolved)."""
    try:
        return create_dit(cfg.name, decay=cfg.decay, learn_sigma=cfg.learn_sigma, num_classes=cfg.num_classes,
                          in_channels=cfg.in_chans, input_size=input_size, **cfg.kwargs)
    except ValueError as e:  # unknown name, or an image side the patch size does not divide
        raise ConfigError(f"model: {e}") from e


class Generate(Task):
    """Train a class-conditional DiT (``sdt gen-train``): the objective's training loss; validation is the
    same loss at fixed (seeded) timesteps and noise, so that evaluations are comparable across epochs
    (lower is better). After training, ``samples.png``: a row per class with the final EMA weights."""
    config_class = GenConfig
    metric = "loss"
    higher_is_better = False
    report_title = "Generation training report"

    def run_name(self, cfg: GenConfig) -> str:
        return f"{cfg.model.name}-{cfg.model.decay}"

    def build(self, cfg: GenConfig, dist_info: DistInfo) -> Built:
        """Every check of the config, data and model (nothing is written), then the DiT and the datasets."""
        check_gen_config(cfg)
        channels = resolve_in_chans(cfg.data, cfg.model.in_chans)
        size = cfg.data.input_size
        datasets = split_datasets(cfg.data, ("train", "val"), channels,
                                  lambda training: generation_transform(cfg.data, cfg.aug.hflip, training), cfg.engine.seed)
        num_classes = resolve_num_classes(cfg.model.num_classes, datasets["train"].classes)
        self.cfg = replace(cfg, model=replace(cfg.model, in_chans=channels, num_classes=num_classes))
        self.dist = dist_info
        torch.manual_seed(cfg.engine.seed)
        model = build_model(self.cfg.model, size)
        for ds in datasets.values():
            check_images(ds, channels, num_classes, model.patch_size)
        self.objective = create_objective(cfg.model.objective, cfg.model.learn_sigma)
        self.figures = ("![samples](samples.png) (EMA weights, a row per class)",) if cfg.sample.preview_per_class else ()
        m = cfg.model
        return Built(self.cfg, model, datasets["train"], datasets["val"], f"{m.name} (decay {m.decay}, {m.objective} objective)",
                     cfg.data.dataset, (channels, size, size), flops_inputs=(torch.zeros(1), torch.zeros(1, dtype=torch.long)),
                     summary=dict(model=m.name, decay=m.decay, objective=m.objective), workers=cfg.data.workers,
                     repeated_aug=cfg.data.repeated_aug)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        # timesteps, noise and label dropout draw from the loop's RNG, which checkpoints save
        return self.objective.training_losses(model, batch.images, batch.targets)["loss"].mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=dist_info.device)
        seed = self.cfg.engine.seed
        for index, batch in enumerate(loader):
            if len(batch.images) == 0:
                continue
            generator = torch.Generator(dist_info.device).manual_seed(seed * SEED_STRIDE + index * dist_info.world_size + dist_info.rank)
            images, labels = batch.images.to(dist_info.device), batch.targets.to(dist_info.device)
            losses = self.objective.training_losses(model, images, labels, generator)["loss"]
            sums += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64, device=dist_info.device)])
        all_reduce_sum(sums, dist_info)
        model.train(was_training)
        return {"loss": (sums[0] / sums[1].clamp(min=1)).item()}

    def finish(self, trainer: Trainer, summary: Dict[str, Any]) -> None:
        """samples.png: a row per class, drawn with the final EMA weights (main process). No test split:
        a generator's score is its samples' FID (``sdt sample``, ``sdt fid``)."""
        cfg = self.cfg
        if not (self.dist.is_main and cfg.sample.preview_per_class):
            return
        sampling_model = (trainer.ema.module if trainer.ema is not None else trainer.model).eval()
        labels = class_labels(cfg.model.num_classes, cfg.sample.preview_per_class)
        images = sample_images(sampling_model, cfg.model.objective, labels.to(self.dist.device), seed=0,
                               sampler=cfg.sample.sampler, num_steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale)
        save_samples(images, labels, str(trainer.output_dir / "samples"), grid_per_class=cfg.sample.preview_per_class,
                     npz=False)

    def headline(self, s: Dict[str, Any]) -> str:
        return (f"{s['global_step']} steps, {s['train_images_per_s']:.0f} training images/s, "
                f"final val loss {s['final_val']['loss']:.4f}")

    def report_rows(self, s: Dict[str, Any]) -> Rows:
        final, cfg = s["final_val"], self.cfg
        return [
            ("model", f"`{s['model']}`, decay `{s['decay']}`, {s['objective']} objective ({s['params'] / 1e6:.2f}M parameters, "
                      f"{s['flops'] / 1e6:.1f} MMACs at {s['input_size']}x{s['input_size']})"),
            ("data", f"{cfg.data.dataset} {cfg.data.data_dir or ''}".strip()),
            ("epochs / steps / global batch / processes",
             f"{cfg.engine.epochs} / {s['global_step']} / {cfg.engine.batch_size} / {s['processes']}"),
            ("final val loss (model / EMA)", f"{final['loss']:.4f} / {final.get('ema_loss', float('nan')):.4f}"),
            self.best_row(s, "loss", digits=4),
            *self.timing_rows(s, wall="wall time (this segment)"),
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
