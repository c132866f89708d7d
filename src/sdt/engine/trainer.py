"""The one training loop: optimizer and schedule, EMA, mixed precision, DDP, checkpoints, resume, logging.

What is trained and how it is scored is a ``Task`` (two methods); everything else lives here, so
every task (classification in ``sdt.train``, generation in ``sdt.generate``) shares one loop and one
run sequence. A task's run function hands ``run_task`` a builder that checks its config, data and
model and returns its ``RunParts``; ``run_task`` does the rest (run folder, lock, Trainer, fit,
summary.json, curves.png, report.md):

    summary = run_task(TrainConfig, cfg, output_dir, resume, cfg.model.name, build)

The pieces stay public for a loop of one's own:

    cfg, info, out, resume_from = resolve_run(TrainConfig, cfg, output_dir, resume, "name")
    trainer = Trainer(cfg.engine, model, task, train_set, val_set, out, info)
    with start_run(cfg, out, info, resume_from is not None):
        summary = trainer.fit()

Run layout (``output_dir``)::

    config.yaml                  the fully resolved config (``start_run``)
    metrics.jsonl                one JSON record per log step and per evaluation
    tb/                          TensorBoard events
    train.log                    the log
    checkpoints/step-00001234/   model.safetensors, ema.safetensors, state.pt (written as a whole:
                                 temp folder + rename); the newest one is ``last``
    best.safetensors             weights with the best validation metric (model or EMA)
    summary.json, report.md, curves.png   written by ``run_task`` at the end

Exact resume: the data order of an epoch is a function of (seed, epoch) (``ResumableSampler``),
augmentation is seeded per sample (``sdt.data.ImageSamples``), and the checkpoint holds every
RNG state of the loop; a run killed mid-epoch and resumed from its last checkpoint therefore
reproduces the uninterrupted run bitwise on CPU with the same number of processes.
"""
import errno
import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoints import (CheckpointError, atomic_write, find_last_checkpoint, load_into, load_train_state,
                          load_weights, prune_checkpoints, remove_temp_checkpoints, save_weights, write_checkpoint)
from .config import ConfigError, config_to_dict
from .data import Batch, collate
from .errors import SdtError
from .plots import plot_curves

if TYPE_CHECKING:
    import tqdm

_logger = logging.getLogger("sdt")


@dataclass
class EngineConfig:
    """How to train, independent of the task. ``batch_size`` is global (split across processes)."""
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    # optimizer: timm create_optimizer_v2; lr is per lr_base_size images, scaled linearly to batch_size
    opt: str = "adamw"
    lr: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    clip_grad: Optional[float] = None      # max gradient norm (None = off)
    # schedule: timm create_scheduler_v2
    sched: str = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    sched_on_updates: bool = True          # False: lr changes once per epoch (RMT/DeiT)
    # model averaging and precision
    ema_decay: Optional[float] = None      # e.g. 0.9998 (None = no EMA)
    ema_warmup: bool = True
    amp: str = "none"                      # "none", "bf16" (CPU or GPU), "fp16" (GPU, with a grad scaler)
    compile: bool = False                  # torch.compile the model
    grad_checkpointing: bool = False       # model.set_grad_checkpointing(): less memory, more compute
    grad_accum_steps: int = 1              # micro-batches per optimizer step (each batch_size / processes / this)
    sync_bn: bool = False                  # SyncBatchNorm when several processes train
    device: str = "auto"                   # "auto", "cpu", "cuda"
    threads: Optional[int] = None          # torch.set_num_threads (None = torch's default)
    # checkpoints and logging
    ckpt_every_steps: int = 500            # also checkpoint every N optimizer steps (0 = epoch ends only)
    keep_checkpoints: int = 2              # how many step checkpoints to keep
    log_every_steps: int = 50
    eval_every_epochs: int = 1


class Task(Protocol):
    """What the engine trains. ``metric`` names the key of ``evaluate``'s result that selects
    ``best``; higher is better unless the task sets ``higher_is_better = False`` (a loss)."""
    metric: str

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch (called under autocast)."""

    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: "DistInfo") -> Dict[str, float]:
        """Metrics over the whole loader, reduced across processes."""


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Start torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA device is available; use engine.device=cpu (or auto)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    info = DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=world_size, local_rank=local_rank,
                    device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
    if use_cuda:
        torch.cuda.set_device(info.device)
    return info


def all_reduce_sum(tensor: Tensor, dist_info: DistInfo) -> Tensor:
    """Sum a tensor over processes (identity in one process)."""
    if dist_info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Data order


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by (seed, epoch)) that can start ``start_step`` batches into
    an epoch. Rank r takes every world_size-th index, so the union of the ranks' i-th batches is the
    one-process i-th batch of the same global size.

    ``repeats`` > 1 is DeiT's repeated augmentation: each image of the shuffled order appears
    ``repeats`` times in a row (so copies land on neighbouring ranks, or in one batch), as sample
    id ``copy * len(dataset) + index``, which ``sdt.data.ImageSamples`` maps back to the image while
    seeding each copy's augmentation differently. An epoch keeps the length of a plain one, so it
    sees about len(dataset) / repeats distinct images (as timm's ``RepeatAugSampler``).
    """

    def __init__(self, dataset: Dataset, dist_info: DistInfo, seed: int, batch_size_per_rank: int, repeats: int = 1):
        super().__init__(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                         shuffle=True, seed=seed, drop_last=True)
        if repeats < 1:
            raise ConfigError(f"data.repeated_aug must be >= 1 (1 = off, DeiT uses 3), got {repeats}")
        self.batch_size_per_rank = batch_size_per_rank
        self.repeats = repeats
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        if self.repeats == 1:
            indices = list(super().__iter__())
        else:
            n = len(self.dataset)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            ids = (order[:, None] + n * torch.arange(self.repeats)).flatten()[:self.total_size]
            indices = ids[self.rank:self.total_size:self.num_replicas].tolist()
        return iter(indices[self.start_step * self.batch_size_per_rank:])

    def __len__(self) -> int:
        return super().__len__() - self.start_step * self.batch_size_per_rank


def eval_loader(dataset: Dataset, batch_size: int, workers: int, dist_info: DistInfo) -> DataLoader:
    """In-order loader over this process's shard (rank, rank + world_size, ...), nothing padded."""
    return DataLoader(dataset, batch_size=batch_size, sampler=list(range(dist_info.rank, len(dataset), dist_info.world_size)),
                      num_workers=workers, collate_fn=collate, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------
# RNG state (saved in checkpoints)


def _rng_state() -> Dict[str, Any]:
    import random

    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """JSON lines + TensorBoard on the main process; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: Optional[int]):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what a killed run logged after its last checkpoint: it is about to be redone.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=resume_step)

    def log(self, kind: str, step: int, epoch: float, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "epoch": round(epoch, 4), **values}) + "\n")
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def final_val_metrics(output_dir: Path) -> Dict[str, float]:
    """The last validation record of a run's metrics.jsonl, without its bookkeeping keys."""
    last = [r for r in read_metrics(Path(output_dir) / "metrics.jsonl") if r["kind"] == "val"][-1]
    return {k: v for k, v in last.items() if k not in ("kind", "step", "epoch")}


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "img") -> "tqdm.tqdm":
    """A tqdm bar counting images (or ``unit``) on stderr (rate, ETA); in a log file (not a terminal) it
    writes a line every 30 s instead of every second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit == "img", desc=desc, dynamic_ncols=True,
                disable=not enabled, mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def setup_logging(output_dir: Optional[Path], is_main: bool) -> None:
    """Log to stderr (and ``output_dir/train.log``) on the main process; warnings only elsewhere."""
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    _logger.handlers.clear()
    _logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and is_main:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        _logger.addHandler(handler)


# ---------------------------------------------------------------------------------------------
# The loop


SCHEDULER_CHOICES = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "rsqrt", "constant")  # create_scheduler_v2


def check_engine_settings(cfg: EngineConfig) -> None:
    """Each engine setting on its own: a number in its range, a name among the choices (``ConfigError``)."""
    from timm.optim import list_optimizers

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"engine.{key} must be {rule}, got {getattr(cfg, key)!r}")

    def finite(x: float) -> bool:
        return math.isfinite(x)

    require(cfg.epochs >= 1, "epochs", "at least 1")
    require(cfg.batch_size >= 1, "batch_size", "at least 1 (it is the global batch: images per optimizer step)")
    require(cfg.grad_accum_steps >= 1, "grad_accum_steps", "at least 1 (1 = no accumulation)")
    require(finite(cfg.lr) and cfg.lr > 0, "lr", "a positive number")
    require(cfg.lr_base_size >= 1, "lr_base_size", "at least 1")
    require(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", ">= 0")
    require(finite(cfg.opt_eps) and cfg.opt_eps > 0, "opt_eps", "a positive number")
    require(cfg.clip_grad is None or finite(cfg.clip_grad) and cfg.clip_grad > 0, "clip_grad", "a positive number or null (off)")
    require(cfg.opt.lower() in list_optimizers(), "opt", "a timm optimizer name (e.g. adamw, sgd, lamb; "
                                                         "timm.optim.list_optimizers() lists them)")
    require(cfg.sched in SCHEDULER_CHOICES, "sched", f"one of {', '.join(SCHEDULER_CHOICES)}")
    require(finite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0, "warmup_epochs", ">= 0")
    require(finite(cfg.warmup_lr) and cfg.warmup_lr >= 0, "warmup_lr", ">= 0")
    require(finite(cfg.min_lr) and cfg.min_lr >= 0, "min_lr", ">= 0")
    require(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, "ema_decay", "in (0, 1), e.g. 0.9998, or null (no EMA)")
    require(cfg.amp in ("none", "bf16", "fp16"), "amp", "none, bf16 or fp16")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
    require(cfg.threads is None or cfg.threads >= 1, "threads", "at least 1, or null (torch's default)")
    require(cfg.ckpt_every_steps >= 0, "ckpt_every_steps", ">= 0 (0 = at epoch ends only)")
    require(cfg.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
    require(cfg.log_every_steps >= 1, "log_every_steps", "at least 1")
    require(cfg.eval_every_epochs >= 1, "eval_every_epochs", "at least 1")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 GEMMs in hardware (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_engine_config(cfg: EngineConfig, dist_info: DistInfo, num_train: int, model: Optional[nn.Module] = None) -> None:
    """Settings that cannot work, on their own or on this machine, data and ``model``: a
    ``ConfigError`` before anything runs or is written."""
    check_engine_settings(cfg)
    per_step = dist_info.world_size * cfg.grad_accum_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f"engine.batch_size={cfg.batch_size} (the global batch) must be divisible by the number of "
                          f"processes ({dist_info.world_size}) x engine.grad_accum_steps ({cfg.grad_accum_steps}); "
                          f"choose grad_accum_steps so that batch_size / (processes x grad_accum_steps) is an integer")
    if num_train < cfg.batch_size:
        raise ConfigError(f"the training set ({num_train} images) is smaller than one batch "
                          f"(engine.batch_size={cfg.batch_size}); lower the batch size")
    if cfg.amp == "fp16" and dist_info.device.type != "cuda":
        raise ConfigError("engine.amp=fp16 needs a GPU; on CPU use engine.amp=bf16")
    if cfg.amp == "bf16" and dist_info.device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("engine.amp=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): torch emulates bf16 "
                      "there, which is many times slower than float32 (sdt_h_tiny inference ran at 0.08x float32 on an "
                      "AVX2-only EPYC, docs/benchmarks.md); use engine.amp=none on this machine", stacklevel=2)
    if cfg.sync_bn and dist_info.distributed and dist_info.device.type != "cuda":
        raise ConfigError("engine.sync_bn=true needs GPUs (torch's SyncBatchNorm is CUDA-only); on CPU each "
                          "process normalises with its own batch statistics: set engine.sync_bn=false")
    if cfg.grad_checkpointing and model is not None and not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"engine.grad_checkpointing=true, but {type(model).__name__} has no set_grad_checkpointing(); "
                          f"set engine.grad_checkpointing=false")


class Trainer:
    """Trains ``model`` on ``train_set`` with ``task``'s loss; evaluates on ``val_set`` every
    ``eval_every_epochs``; checkpoints to ``output_dir``. ``resume_from``: a checkpoint folder."""

    def __init__(self, cfg: EngineConfig, model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset,
                 output_dir: Path, dist_info: DistInfo, workers: int = 2,
                 resume_from: Optional[Path] = None, repeated_aug: int = 1):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.cfg, self.task, self.dist, self.output_dir = cfg, task, dist_info, Path(output_dir)
        self.train_set, self.val_set, self.workers, self.repeated_aug = train_set, val_set, workers, repeated_aug
        check_engine_config(cfg, dist_info, len(train_set), model)
        # an optimizer step takes batch_size images: grad_accum_steps micro-batches on each process
        self.step_batch_per_rank = cfg.batch_size // dist_info.world_size
        self.batch_size_per_rank = self.step_batch_per_rank // cfg.grad_accum_steps  # images per forward pass
        self.steps_per_epoch = len(train_set) // cfg.batch_size

        state = load_train_state(resume_from) if resume_from is not None else None
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(dist_info.device)
        if state is not None:
            load_into(model, load_weights(resume_from / "model.safetensors"), resume_from / "model.safetensors")
        self.lr = cfg.lr * cfg.batch_size / cfg.lr_base_size
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=not cfg.sched_on_updates,
            updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(dist_info.device.type, enabled=cfg.amp == "fp16")
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema_decay else None

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        worst = -math.inf if getattr(task, "higher_is_better", True) else math.inf
        self.best: Dict[str, Any] = {"value": worst, "epoch": -1, "source": ""}
        self.train_seconds, self.train_images = 0.0, 0
        self._rng_to_restore: Optional[Dict[str, Any]] = None
        if state is not None:
            self._load_state(state, resume_from)

        if dist_info.distributed:
            if cfg.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        self.ddp = model if dist_info.distributed else None
        self.train_model = torch.compile(model) if cfg.compile else model
        self.model = unwrap(model)  # the plain module (SyncBatchNorm conversion makes a new one)
        self.resume_step = self.global_step if state is not None else None

    # -- state ----------------------------------------------------------------------------------

    def _load_state(self, state: Dict[str, Any], ckpt_dir: Path) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"training state in {ckpt_dir} does not fit this run's optimizer/schedule: {e}") from e
        if self.ema is not None:
            load_into(self.ema.module, load_weights(ckpt_dir / "ema.safetensors"), ckpt_dir / "ema.safetensors")
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best = state["best"]
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        if state["world_size"] != self.dist.world_size:
            _logger.warning("resuming a %d-process run with %d processes: the data order is the same, "
                            "but results will not be bitwise identical", state["world_size"], self.dist.world_size)
        self._rng_to_restore = state["rng"][min(self.dist.rank, len(state["rng"]) - 1)]

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` as a whole (temp folder, then rename) and apply retention."""
        rng = [_rng_state()]
        if self.dist.distributed:
            gathered: List[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not self.dist.is_main:
            return
        weights = {"model": self.model.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.module.state_dict()
        state = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng, "best": self.best,
            "train_seconds": self.train_seconds, "train_images": self.train_images,
        }
        write_checkpoint(self.output_dir, self.global_step, weights, state,
                         {"global_step": str(self.global_step), "epoch": str(self.epoch)})
        prune_checkpoints(self.output_dir, self.cfg.keep_checkpoints)

    # -- loop -----------------------------------------------------------------------------------

    def _autocast(self) -> ContextManager[Any]:
        if self.cfg.amp == "none":
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16)

    def _usable(self, window: List[Batch]) -> List[Batch]:
        """The micro-batches of one step that every process can train on. A process whose micro-batch
        lost all its images (unreadable files) cannot join that backward pass's gradient all-reduce,
        so all processes drop that micro-batch together instead of waiting for each other forever."""
        has_images = torch.tensor([len(b.images) > 0 for b in window], dtype=torch.int32, device=self.dist.device)
        if self.dist.distributed:
            dist.all_reduce(has_images, op=dist.ReduceOp.MIN)
        return [b for b, ok in zip(window, has_images.tolist()) if ok]

    def _train_step(self, window: List[Batch]) -> Tensor:
        """One optimizer step on the micro-batches of ``window``: their mean loss's gradients are
        accumulated, and DDP all-reduces them once, in the last backward pass (``no_sync`` before)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dist.device)
        for i, batch in enumerate(window):
            batch = Batch(batch.images.to(self.dist.device, non_blocking=True),
                          batch.targets.to(self.dist.device, non_blocking=True), batch.skipped)
            last = i == len(window) - 1
            with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with self._autocast():
                    loss = self.task.loss(self.train_model, batch) / len(window)
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return total

    def evaluate(self) -> Dict[str, float]:
        """Validation metrics of the model and, if there is one, of its EMA (keys prefixed ``ema_``)."""
        loader = eval_loader(self.val_set, self.batch_size_per_rank, self.workers, self.dist)
        if self.dist.distributed:
            # Each process ends its last step with the BatchNorm statistics of its own batches (DDP
            # broadcasts buffers before a forward, not after), so score every shard with rank 0's, the
            # buffers that are saved.
            for module in [unwrap(self.model)] + ([self.ema.module] if self.ema is not None else []):
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)
        with self._autocast():
            metrics = self.task.evaluate(self.model, loader, self.dist)
            if self.ema is not None:
                metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, loader, self.dist).items()})
        return metrics

    def _update_best(self, metrics: Dict[str, float]) -> None:
        sign = 1.0 if getattr(self.task, "higher_is_better", True) else -1.0
        candidates = [("model", metrics[self.task.metric], self.model)]
        if self.ema is not None:
            candidates.append(("ema", metrics["ema_" + self.task.metric], self.ema.module))
        source, value, module = max(candidates, key=lambda c: sign * c[1])
        if sign * value > sign * self.best["value"]:
            self.best = {"value": value, "epoch": self.epoch, "source": source}
            if self.dist.is_main:
                save_weights(self.output_dir / "best.safetensors", module.state_dict(),
                             {"epoch": str(self.epoch), "source": source, self.task.metric: f"{value:.6f}"})

    def fit(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.dist
        logger = MetricsLogger(self.output_dir, info.is_main, self.resume_step)
        sampler = ResumableSampler(self.train_set, info, cfg.seed, self.step_batch_per_rank, self.repeated_aug)
        loader = DataLoader(self.train_set, batch_size=self.batch_size_per_rank, sampler=sampler, drop_last=True,
                            num_workers=self.workers, collate_fn=collate, generator=torch.Generator(),
                            pin_memory=info.device.type == "cuda")
        if self.resume_step is not None:
            _set_rng_state(self._rng_to_restore)
            _logger.info("resumed at epoch %d, step %d (global step %d)", self.epoch + 1, self.step_in_epoch, self.global_step)
        else:
            torch.manual_seed(cfg.seed + info.rank)
            np.random.seed(cfg.seed + info.rank)
            import random

            random.seed(cfg.seed + info.rank)
        images_per_step = cfg.batch_size
        skipped_total, skipped_reported = 0, 0
        while self.epoch < cfg.epochs:
            sampler.set_position(self.epoch, self.step_in_epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            self.train_model.train()
            bar = progress_bar(self.steps_per_epoch * images_per_step, f"epoch {self.epoch + 1}/{cfg.epochs}",
                               info.is_main, initial=self.step_in_epoch * images_per_step)
            loss_sum, loss_count, interval_start = torch.zeros((), device=info.device), 0, time.perf_counter()
            tick = time.perf_counter()
            micro_batches = iter(loader)  # at least grad_accum_steps x the steps left in this epoch
            while self.step_in_epoch < self.steps_per_epoch:
                window = [next(micro_batches) for _ in range(cfg.grad_accum_steps)]
                skipped_total += sum(b.skipped for b in window)
                usable = self._usable(window)
                self.step_in_epoch += 1
                if not usable:  # every micro-batch of this step lost all its images on some process
                    continue
                loss = self._train_step(usable)
                self.global_step += 1
                self.scheduler.step_update(num_updates=self.global_step)
                now = time.perf_counter()
                self.train_seconds, tick = self.train_seconds + now - tick, now
                self.train_images += images_per_step
                loss_sum += loss.float()
                loss_count += 1
                bar.update(images_per_step)
                if self.global_step % cfg.log_every_steps == 0 or self.step_in_epoch == self.steps_per_epoch:
                    stats = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(skipped_total), device=info.device)]), info)
                    mean_loss = stats[0].item() / (max(loss_count, 1) * info.world_size)
                    elapsed = time.perf_counter() - interval_start
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    logger.log("train", self.global_step, self.epoch + self.step_in_epoch / self.steps_per_epoch,
                               {"loss": mean_loss, "lr": lr, "images_per_s": loss_count * images_per_step / elapsed,
                                "skipped_images": stats[1].item()})
                    if stats[1].item() > skipped_reported:
                        skipped_reported = int(stats[1].item())
                        _logger.warning("%d unreadable images skipped so far", skipped_reported)
                    loss_sum.zero_()
                    loss_count, interval_start = 0, time.perf_counter()
                    tick = interval_start
                if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
                    tick = time.perf_counter()
            bar.close()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.scheduler.step(self.epoch)
            if self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs:
                metrics = self.evaluate()
                logger.log("val", self.global_step, self.epoch, metrics)
                self._update_best(metrics)
                _logger.info("epoch %d/%d: %s", self.epoch, cfg.epochs,
                             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.save_checkpoint()
        logger.close()
        return {"best": self.best, "global_step": self.global_step, "train_seconds": self.train_seconds,
                "train_images_per_s": self.train_images / max(self.train_seconds, 1e-9)}


RUN_LOCK = "run.lock"
_held_locks: Dict[Path, Any] = {}  # run folder -> open lock file, for the runs of this process


def lock_run_folder(output_dir: Path) -> None:
    """Take the run folder's exclusive lock (a POSIX lock, ``fcntl.lockf``, on ``<run>/run.lock``, which
    holds the owner's PID and host), or raise a ``ConfigError`` naming the process that holds it. The
    OS drops the lock when its process ends, however it ends; unlike ``flock``, the lock is not shared
    with forked children (DataLoader workers), so a killed run's lingering workers do not keep it.
    POSIX locks are dropped when their process closes *any* descriptor of the file, so nothing in a
    running process may open run.lock a second time. A no-op where ``fcntl`` does not exist (Windows)."""
    key = Path(output_dir).resolve()
    if key in _held_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    lock_file = open(key / RUN_LOCK, "a+")
    try:
        fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise ConfigError(f"{output_dir} is in use by another sdt run ({holder}); wait for it to finish or stop it, "
                          f"then retry (or choose another --output)") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock_file.flush()
    _held_locks[key] = lock_file


def unlock_run_folder(output_dir: Path) -> None:
    """Release the lock ``lock_run_folder`` took (the file stays; it is free again)."""
    lock_file = _held_locks.pop(Path(output_dir).resolve(), None)
    if lock_file is not None:
        lock_file.close()


def check_output_dir(output_dir: Path, resume: bool) -> None:
    """A new run needs a new (or empty) folder, so an earlier run's files are never overwritten;
    a resumed run needs the folder of a run."""
    output_dir = Path(output_dir)
    if resume:
        if not (output_dir / "config.yaml").is_file():
            raise CheckpointError(f"--resume: {output_dir} holds no run (config.yaml is missing)")
    elif output_dir.exists() and any(p.name != RUN_LOCK for p in output_dir.iterdir()):
        raise ConfigError(f"{output_dir} already holds files; pass --resume to continue that run, "
                          f"or choose a new --output folder")


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:  # sections, not model.kwargs
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resumed_config_changes(passed: Any, saved: Any) -> List[str]:
    """The keys (``section.key``) where ``passed`` sets a value other than the ``saved`` run config's;
    a key ``passed`` leaves unset (None) that the run resolved (``model.num_classes``) is no change."""
    new, old = _flat(config_to_dict(passed)), _flat(config_to_dict(saved))
    return sorted(k for k, v in new.items() if v is not None and old.get(k) != v)


def resolve_run(config_class: type, cfg: Optional[Any], output_dir: Optional[str], resume: Optional[str],
                default_name: Union[str, Callable[[Any], str]]) -> Tuple[Any, DistInfo, Path, Optional[Path]]:
    """The config, processes, run folder and checkpoint of a new or resumed run; writes nothing.

    ``resume``: None (new run), ``"auto"`` (the newest checkpoint of ``output_dir``) or a checkpoint
    folder. A resumed run continues with the config saved in ``output_dir``: pass ``cfg=None``; a
    ``cfg`` that sets other values than the saved one is ignored with a ``UserWarning`` naming the
    keys (a run cannot change its config half-way). A new run with ``cfg=None`` uses
    ``config_class()``. Without ``output_dir`` a new run goes to ``runs/<default_name>-<date>-<time>``
    (the same name on every rank); ``default_name`` may be a function of the config.
    """
    from .config import load_config

    resume_from = None
    if resume is not None:
        if output_dir is None:
            raise ConfigError("--resume needs the --output folder of the run to continue")
        check_output_dir(Path(output_dir), resume=True)
        resume_from = find_last_checkpoint(Path(output_dir)) if resume == "auto" else Path(resume)
        saved = load_config(config_class, str(Path(output_dir) / "config.yaml"))
        changed = [] if cfg is None else resumed_config_changes(cfg, saved)
        if changed:
            warnings.warn(f"resume continues {output_dir} with its saved config.yaml; the config passed sets other "
                          f"values for {', '.join(changed)}, which are ignored (start a new run to change them)",
                          UserWarning, stacklevel=4)  # the caller of train() / train_generator()
        cfg = saved
    elif cfg is None:
        cfg = config_class()
    info = setup_distributed(cfg.engine.device)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if output_dir is None:
        name = default_name(cfg) if callable(default_name) else default_name
        box = [f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if info.distributed:
            dist.broadcast_object_list(box, src=0)
        output_dir = box[0]
    return cfg, info, Path(output_dir), resume_from


class RunHandle:
    """What ``start_run`` returns: ``with start_run(...):`` releases the run folder's lock at the end
    of the block; without ``with`` the lock is held until the process ends."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> "RunHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        unlock_run_folder(self.out)


def start_run(cfg: Any, out: Path, info: DistInfo, resumed: bool) -> RunHandle:
    """After every check has passed: lock the run folder (held until the end of ``with start_run(...):``),
    refuse a folder that holds another run, remove the temp folders of saves killed mid-way, write
    ``config.yaml`` (new runs), start logging. All ranks call it; only rank 0 touches the folder, and
    an error there is raised on every rank."""
    from .config import save_config

    # Only rank 0 judges the folder: another rank may look after rank 0 has written config.yaml.
    error, removed = None, []
    if info.is_main:
        try:
            check_output_dir(out, resumed)  # refuse before touching anything
            out.mkdir(parents=True, exist_ok=True)
            lock_run_folder(out)
            check_output_dir(out, resumed)  # again under the lock: another run may have started in between
            removed = remove_temp_checkpoints(out)
            if not resumed:
                save_config(cfg, out / "config.yaml")
        except SdtError as e:
            unlock_run_folder(out)
            error = e
    if info.distributed:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            error = ConfigError(box[0])
    if error is not None:
        raise error
    setup_logging(out, info.is_main)
    if removed:
        _logger.info("removed %d temp checkpoint folder(s) left by an interrupted save: %s",
                     len(removed), ", ".join(p.name for p in removed))
    return RunHandle(out)


# ---------------------------------------------------------------------------------------------
# One run, start to end


@dataclass
class RunParts:
    """What a task's builder makes for ``run_task``, after every check of its config, data and model.

    ``input_shape`` (C, H, W) and ``flops_inputs`` (the model's inputs after the image, e.g. a DiT's
    timestep and label, each (1,)) are what the parameter and MAC counts use; ``name`` is the model
    as the log names it. ``summary`` holds the task's entries known before training (``model``, ...);
    ``finish(trainer, summary)`` runs on every process after training (a test evaluation, samples)
    and adds to it; ``report_rows(summary)`` gives the task's rows of report.md and
    ``headline(summary)`` the last log line; ``figures`` are extra Markdown lines of report.md."""
    model: nn.Module
    task: Task
    train_set: Dataset
    val_set: Dataset
    name: str
    input_shape: Tuple[int, int, int]
    summary: Dict[str, Any]
    report_title: str
    report_rows: Callable[[Dict[str, Any]], List[Tuple[str, str]]]
    headline: Callable[[Dict[str, Any]], str]
    flops_inputs: Sequence[Tensor] = ()
    finish: Optional[Callable[["Trainer", Dict[str, Any]], None]] = None
    figures: Sequence[str] = ()


def render_report(title: str, rows: Sequence[Tuple[str, str]], figures: Sequence[str] = ()) -> str:
    """report.md: a two-column table of ``rows``, then ``figures`` and the training curves."""
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    shown = "".join(f"{figure}\n\n" for figure in figures)
    return (f"# {title}\n\n| | |\n|---|---|\n{table}\n\n{shown}![curves](curves.png)\n\n"
            f"Config: `config.yaml`; metrics: `metrics.jsonl`, `tb/`.\n")


def run_task(config_class: type, cfg: Optional[Any], output_dir: Optional[str], resume: Optional[str],
             default_name: Union[str, Callable[[Any], str]], build: Callable[[Any, DistInfo], RunParts]) -> Dict[str, Any]:
    """Train one run of a task, start to end: resolve the run (``resolve_run``), ``build(cfg, dist_info)``
    the task's parts (it checks the config, data and model and may fail: nothing is written yet),
    build the ``Trainer`` (checks the engine settings, loads a resumed run's checkpoint), then, holding
    the run folder's lock (``start_run``), train, ``finish``, and write summary.json, curves.png and
    report.md. ``cfg`` needs ``engine`` and ``data`` sections. Returns the summary."""
    from .complexity import count_flops, count_params

    cfg, info, out, resume_from = resolve_run(config_class, cfg, output_dir, resume, default_name)
    parts = build(cfg, info)
    trainer = Trainer(cfg.engine, parts.model, parts.task, parts.train_set, parts.val_set, out, info,
                      workers=cfg.data.workers, resume_from=resume_from, repeated_aug=getattr(cfg.data, "repeated_aug", 1))
    # counted once the Trainer has accepted the model (a model it refuses may not even run a forward pass)
    params, flops = count_params(trainer.model), count_flops(trainer.model, parts.input_shape, *parts.flops_inputs)
    size = "x".join(map(str, parts.input_shape[1:]))
    with start_run(cfg, out, info, resume_from is not None):  # holds the run folder's lock until the end
        _logger.info("model %s: %.2fM parameters, %.1f MMACs at %s; %d processes on %s; output %s",
                     parts.name, params / 1e6, flops / 1e6, size, info.world_size, info.device, out)
        _logger.info("data %s: %d train / %d val images", getattr(cfg.data, "dataset", type(parts.train_set).__name__),
                     len(parts.train_set), len(parts.val_set))
        wall_start = time.perf_counter()
        summary = trainer.fit()
        summary.update(parts.summary, params=params, flops=flops, input_size=parts.input_shape[-1],
                       processes=info.world_size, wall_seconds=time.perf_counter() - wall_start)
        if parts.finish is not None:
            parts.finish(trainer, summary)
        if info.is_main:
            summary["final_val"] = final_val_metrics(out)
            plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png", parts.task.metric)
            atomic_write(out / "summary.json", json.dumps(summary, indent=2))
            atomic_write(out / "report.md", render_report(parts.report_title, parts.report_rows(summary), parts.figures))
            _logger.info("done: %s, report %s", parts.headline(summary), out / "report.md")
    return summary
