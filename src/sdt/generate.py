"""Train a class-conditional DiT on Fashion-MNIST and sample from it.

``train_generator`` is a deliberately small loop (AdamW, constant lr, no weight decay, EMA, seeded,
atomic safetensors checkpoints, resume) so that it can later move onto the shared training engine.
``sample_images`` draws class-conditional samples with the EMA weights (deterministic given the
seed) and ``save_samples`` writes DiT-style outputs: one PNG grid (a row per class) and an .npz of
uint8 images.

A run folder holds:
    config.json         model name and arguments, objective, training settings
    model.safetensors   raw weights       ema.safetensors   EMA weights (used for sampling)
    state.pt            optimizer state, step, RNG states (tensors only; loaded with weights_only=True)
    log.jsonl           one line per logging interval: step, loss, images/s
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch import Tensor

from .diffusion import SAMPLERS, create_objective
from .data import FASHION_MNIST_DIR, fashion_mnist_tensors
from .models.dit import DiT, create_dit


@dataclass
class GenTrainConfig:
    """Settings of one generation run (written to config.json)."""
    model: str = "dit_n_4"
    attn: str = "cag"
    objective: str = "ddpm"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.9999
    seed: int = 0
    data_dir: str = FASHION_MNIST_DIR
    log_every: int = 50
    checkpoint_every: int = 500
    threads: int = 2


def images_to_model(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def model_to_images(x: Tensor) -> Tensor:
    """float in [-1, 1] (B, C, H, W) -> uint8, rounded and clipped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _atomic_save_file(tensors: Dict[str, Tensor], path: str) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_model(config: GenTrainConfig) -> DiT:
    return create_dit(config.model, attn=config.attn, **config.model_kwargs)


def _save_checkpoint(out_dir: str, model: DiT, ema: ModelEmaV3, optimizer: torch.optim.Optimizer,
                     step: int, generator: torch.Generator) -> None:
    _atomic_save_file(model.state_dict(), os.path.join(out_dir, "model.safetensors"))
    _atomic_save_file(ema.module.state_dict(), os.path.join(out_dir, "ema.safetensors"))
    _atomic_torch_save({"optimizer": optimizer.state_dict(), "step": step, "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state()}, os.path.join(out_dir, "state.pt"))


def train_generator(config: GenTrainConfig, out_dir: str, resume: bool = False) -> Dict[str, float]:
    """Train ``config.model`` on Fashion-MNIST train; returns {"steps", "images_per_s", "final_loss"}.

    With ``resume`` the run continues from out_dir's last checkpoint (weights, EMA, optimizer, step, RNG).
    """
    torch.set_num_threads(config.threads)
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "config.json")
    if resume:
        if not os.path.isfile(os.path.join(out_dir, "state.pt")):
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (state.pt missing); drop --resume to start fresh")
    elif os.path.exists(os.path.join(out_dir, "model.safetensors")):
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or pick another --output")
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(config), f, indent=2)
    os.replace(tmp, config_path)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = fashion_mnist_tensors("train", config.data_dir)
    model = build_model(config)
    objective = create_objective(config.objective, model.learn_sigma)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)
    step = 0
    if resume:
        model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")))
        ema.module.load_state_dict(load_file(os.path.join(out_dir, "ema.safetensors")))
        state = torch.load(os.path.join(out_dir, "state.pt"), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    model.train()
    log = open(os.path.join(out_dir, "log.jsonl"), "a")
    seen, start, loss_sum, loss_count, images_per_s = 0, time.perf_counter(), 0.0, 0, 0.0
    while step < config.steps:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x = images_to_model(images[index])
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = objective.training_losses(model, x, labels[index], generator)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        ema.update(model, step=step)
        seen += config.batch_size
        loss_sum += loss.item()
        loss_count += 1
        if step % config.log_every == 0 or step == config.steps:
            images_per_s = seen / (time.perf_counter() - start)
            record = dict(step=step, loss=loss_sum / loss_count, images_per_s=images_per_s)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"step {step}/{config.steps} loss {record['loss']:.4f} {images_per_s:.1f} img/s", flush=True)
            loss_sum, loss_count = 0.0, 0
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(out_dir, model, ema, optimizer, step, generator)
    log.close()
    return {"steps": step, "images_per_s": images_per_s, "final_loss": loss.item()}


def load_generator(run_dir: str, weights: str = "ema") -> Tuple[DiT, GenTrainConfig]:
    """Rebuild a trained model from a run folder; ``weights`` "ema" (default, DiT samples with EMA) or "model"."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir} is not a generation run (no config.json); give the --output of 'sdt gen-train'")
    with open(config_path) as f:
        config = GenTrainConfig(**json.load(f))
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    model = build_model(config)
    model.load_state_dict(load_file(os.path.join(run_dir, f"{weights}.safetensors")))
    return model.eval(), config


@torch.no_grad()
def sample_images(model: DiT, objective_name: str, labels: Tensor, seed: int = 0, sampler: Optional[str] = None,
                  num_steps: int = 50, cfg_scale: float = 1.0, image_size: Optional[Tuple[int, int]] = None,
                  batch_size: int = 250) -> Tensor:
    """Class-conditional samples, uint8 (N, C, H, W), one per label; the same seed gives the same images.

    cfg_scale 1 is plain conditional sampling; > 1 uses classifier-free guidance. The noise of sample i
    depends only on (seed, i), so the result does not depend on ``batch_size``.
    """
    objective = create_objective(objective_name, model.learn_sigma)
    sampler = sampler or SAMPLERS[objective_name][0]
    height, width = image_size or (model.x_embedder.img_size or (28, 28))
    if cfg_scale == 1.0:
        model_fn = model
    else:
        def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return model.forward_with_cfg(x, t, y, cfg_scale)
    out = []
    for first in range(0, len(labels), batch_size):
        y = labels[first:first + batch_size]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
        noise = torch.randn(len(y), model.in_channels, height, width, generator=generator)
        samples = objective.sample(model_fn, noise, y, sampler, num_steps, generator, clip_denoised=True)  # pixels in [-1, 1]
        out.append(model_to_images(samples))
    return torch.cat(out)


def class_labels(num_classes: int, per_class: int) -> Tensor:
    """[0]*per_class + [1]*per_class + ...: (num_classes * per_class,)"""
    return torch.arange(num_classes).repeat_interleave(per_class)


def image_grid(images: Tensor, rows: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (rows*H, cols*W[, C]) uint8 array, row-major, 1 px gaps."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = torch.zeros(c, rows * (h + 1) - 1, cols * (w + 1) - 1, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_samples(images: Tensor, labels: Tensor, out_prefix: str, grid_per_class: int = 10) -> Dict[str, str]:
    """Write ``<prefix>.npz`` (arr_0: uint8 (N, H, W, C) as DiT's evaluator reads, labels: (N,)) and
    ``<prefix>.png`` (a row per class, the first ``grid_per_class`` samples of each). Returns the paths."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    npz_path, png_path = out_prefix + ".npz", out_prefix + ".png"
    tmp = npz_path + ".tmp.npz"
    np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    os.replace(tmp, npz_path)
    classes = labels.unique()
    rows = torch.cat([images[labels == c][:grid_per_class] for c in classes])
    tmp = png_path + ".tmp.png"
    Image.fromarray(image_grid(rows, len(classes))).save(tmp)
    os.replace(tmp, png_path)
    return {"npz": npz_path, "png": png_path}
