"""The training loop: optimizer and schedule, EMA, mixed precision, DDP, gradient accumulation,
best weights and checkpoints. What is trained and how it is scored is a ``Task`` (``loss`` and
``evaluate``); the run around the loop (folder, lock, report) is ``sdt.engine.run``.

    trainer = Trainer(cfg.engine, model, task, train_set, val_set, out, info)
    summary = trainer.fit()

A run killed mid-epoch and resumed from its last checkpoint reproduces the uninterrupted run
bitwise on CPU with the same number of processes (``sdt.engine.dist``).
"""
import logging
import math
from contextlib import nullcontext
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import Batch, collate
from ..errors import CheckpointError, ConfigError
from ..files import load_into, load_weights, save_weights
from .checkpoints import load_train_state, prune_checkpoints, write_checkpoint
from .config import EngineConfig, check_engine_config
from .dist import (DistInfo, ResumableSampler, all_rng_states, broadcast_buffers, distribute, eval_loader, seed_everything,
                   set_rng_state, unwrap, usable_batches)
from .log import MetricsLogger, StepLog, progress_bar

_logger = logging.getLogger("sdt")


class Task(Protocol):
    """What the loop trains. ``metric`` names the key of ``evaluate``'s result that selects
    ``best``; higher is better unless the task sets ``higher_is_better = False`` (a loss)."""
    metric: str

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch (called under autocast)."""

    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        """Metrics over the whole loader, reduced across processes."""


def autocast(amp: str, device: torch.device) -> ContextManager[Any]:
    """The autocast context of ``engine.amp`` ("none", "bf16", "fp16")."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def scaled_param_groups(model: nn.Module, cfg: EngineConfig) -> List[Dict[str, Any]]:
    """timm's parameter groups (weight decay, and layer decay when set), each split by ``cfg.lr_scale``:
    a parameter whose name matches a pattern gets that factor on its group's ``lr_scale``, which timm's
    schedulers multiply into the lr. A pattern that matches no parameter is a ``ConfigError``."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                          no_weight_decay_list=no_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    unmatched = [pattern for pattern in cfg.lr_scale if not any(fnmatch(n, pattern) for n in names.values())]
    if unmatched:
        example = next(iter(names.values()), "")
        raise ConfigError(f"engine.lr_scale: pattern(s) {', '.join(map(repr, unmatched))} match no parameter of the "
                          f"model; patterns are fnmatch patterns on parameter names such as {example!r}")

    def factor(p: nn.Parameter) -> float:
        return next((f for pattern, f in cfg.lr_scale.items() if fnmatch(names[id(p)], pattern)), 1.0)

    out = []
    for group in groups:
        by_factor: Dict[float, List[nn.Parameter]] = {}
        for p in group["params"]:
            by_factor.setdefault(factor(p), []).append(p)
        for f, params in by_factor.items():
            out.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * f})
    return out


def optimization(cfg: EngineConfig, model: nn.Module, lr: float, steps_per_epoch: int, device: torch.device) -> Tuple[
        torch.optim.Optimizer, Any, torch.amp.GradScaler, Optional[Any]]:
    """timm's optimizer and schedule, the fp16 gradient scaler (off otherwise) and the EMA of ``model`` (or None)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    # layer_decay: timm's layer-wise lr decay, layers from the model's group_matcher() (stem first, head last)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
                                    layer_decay=cfg.layer_decay,
                                    param_group_fn=partial(scaled_param_groups, cfg=cfg) if cfg.lr_scale else None)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=not cfg.sched_on_updates,
                                       updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema_decay else None
    return optimizer, scheduler, scaler, ema


def console_metrics(metrics: Dict[str, float]) -> str:
    """The epoch's console line; per-part values (``gate_drift.3``) go to metrics.jsonl only."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "." not in k)


class Trainer:
    """Trains ``model`` on ``train_set`` with ``task``'s loss; evaluates on ``val_set`` every
    ``eval_every_epochs``; checkpoints to ``output_dir``. ``resume_from``: a checkpoint folder.
    ``workers`` and ``repeated_aug`` (DeiT's repeated augmentation) are the task's loader settings."""

    def __init__(self, cfg: EngineConfig, model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset,
                 output_dir: Path, dist_info: DistInfo, workers: int = 2,
                 resume_from: Optional[Path] = None, repeated_aug: int = 1):
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
        self.optimizer, self.scheduler, self.scaler, self.ema = optimization(cfg, model, self.lr, self.steps_per_epoch,
                                                                             dist_info.device)

        self.sign = 1.0 if getattr(task, "higher_is_better", True) else -1.0
        self.epoch, self.step_in_epoch, self.global_step, self.train_seconds, self.train_images = 0, 0, 0, 0.0, 0
        self.best: Dict[str, Any] = {"value": -self.sign * math.inf, "epoch": -1, "source": ""}
        self.resume_step = None
        if state is not None:
            self._load_state(state, resume_from)

        model = distribute(model, dist_info, cfg.sync_bn)
        self.ddp = model if dist_info.distributed else None
        self.train_model = torch.compile(model) if cfg.compile else model
        self.model = unwrap(model)  # the plain module (SyncBatchNorm conversion makes a new one)

    def _load_state(self, state: Dict[str, Any], ckpt_dir: Path) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"training state in {ckpt_dir} does not fit this run's optimizer/schedule: {e}") from e
        if self.ema is not None:
            load_into(self.ema.module, load_weights(ckpt_dir / "ema.safetensors"), ckpt_dir / "ema.safetensors")
        for key in ("epoch", "step_in_epoch", "global_step", "best", "train_seconds", "train_images"):
            setattr(self, key, state[key])
        if state["world_size"] != self.dist.world_size:
            _logger.warning("resuming a %d-process run with %d processes: the data order is the same, "
                            "but results will not be bitwise identical", state["world_size"], self.dist.world_size)
        self.resume_step = self.global_step
        self._rng_to_restore = state["rng"][min(self.dist.rank, len(state["rng"]) - 1)]

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` as a whole (temp folder, then rename) and apply retention."""
        rng = all_rng_states(self.dist)
        if not self.dist.is_main:
            return
        weights = {"model": self.model.state_dict(), **({"ema": self.ema.module.state_dict()} if self.ema is not None else {})}
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
                with autocast(self.cfg.amp, self.dist.device):
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
        models = {"": self.model} if self.ema is None else {"": self.model, "ema_": self.ema.module}
        # Each process ends its last step with the BatchNorm statistics of its own batches: score every
        # shard with rank 0's, the buffers that are saved.
        broadcast_buffers(list(models.values()), self.dist)
        metrics: Dict[str, float] = {}
        with autocast(self.cfg.amp, self.dist.device):
            for prefix, model in models.items():
                metrics.update({prefix + k: v for k, v in self.task.evaluate(model, loader, self.dist).items()})
        return metrics

    def _update_best(self, metrics: Dict[str, float]) -> None:
        candidates = [("model", metrics[self.task.metric], self.model)]
        if self.ema is not None:
            candidates.append(("ema", metrics["ema_" + self.task.metric], self.ema.module))
        source, value, module = max(candidates, key=lambda c: self.sign * c[1])
        if self.sign * value > self.sign * self.best["value"]:
            self.best = {"value": value, "epoch": self.epoch, "source": source}
            if self.dist.is_main:
                save_weights(self.output_dir / "best.safetensors", module.state_dict(),
                             {"epoch": str(self.epoch), "source": source, self.task.metric: f"{value:.6f}"})

    def fit(self) -> Dict[str, Any]:
        """Train to ``cfg.epochs`` (from where a resumed run stopped); returns the loop's summary."""
        cfg, info = self.cfg, self.dist
        logger = MetricsLogger(self.output_dir, info.is_main, self.resume_step)
        sampler = ResumableSampler(self.train_set, info, cfg.seed, self.step_batch_per_rank, self.repeated_aug)
        loader = DataLoader(self.train_set, batch_size=self.batch_size_per_rank, sampler=sampler, drop_last=True,
                            num_workers=self.workers, collate_fn=collate, generator=torch.Generator(),
                            pin_memory=info.device.type == "cuda")
        if self.resume_step is not None:
            set_rng_state(self._rng_to_restore)
            _logger.info("resumed at epoch %d, step %d (global step %d)", self.epoch + 1, self.step_in_epoch, self.global_step)
        else:
            seed_everything(cfg.seed + info.rank)
        log = StepLog(logger, info)
        while self.epoch < cfg.epochs:
            sampler.set_position(self.epoch, self.step_in_epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            self.train_model.train()
            train_one_epoch(self, loader, log)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.scheduler.step(self.epoch)
            if self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs:
                metrics = self.evaluate()
                logger.log("val", self.global_step, self.epoch, metrics)
                self._update_best(metrics)
                _logger.info("epoch %d/%d: %s", self.epoch, cfg.epochs, console_metrics(metrics))
            self.save_checkpoint()
        logger.close()
        return {"best": self.best, "global_step": self.global_step, "train_seconds": self.train_seconds,
                "train_images_per_s": self.train_images / max(self.train_seconds, 1e-9)}


def train_one_epoch(trainer: Trainer, loader: DataLoader, log: StepLog) -> None:
    """The optimizer steps left in ``trainer``'s epoch; a checkpoint every ``ckpt_every_steps`` inside it."""
    cfg = trainer.cfg
    bar = progress_bar(trainer.steps_per_epoch * cfg.batch_size, f"epoch {trainer.epoch + 1}/{cfg.epochs}",
                       trainer.dist.is_main, initial=trainer.step_in_epoch * cfg.batch_size)
    log.start_interval()
    micro_batches = iter(loader)  # at least grad_accum_steps x the steps left in this epoch
    while trainer.step_in_epoch < trainer.steps_per_epoch:
        window = [next(micro_batches) for _ in range(cfg.grad_accum_steps)]
        log.skipped_total += sum(b.skipped for b in window)
        usable = usable_batches(window, trainer.dist)
        trainer.step_in_epoch += 1
        if not usable:  # every micro-batch of this step lost all its images on some process
            continue
        loss = trainer._train_step(usable)
        trainer.global_step += 1
        trainer.scheduler.step_update(num_updates=trainer.global_step)
        trainer.train_seconds += log.add_step(loss, cfg.batch_size)
        trainer.train_images += cfg.batch_size
        bar.update(cfg.batch_size)
        if trainer.global_step % cfg.log_every_steps == 0 or trainer.step_in_epoch == trainer.steps_per_epoch:
            log.write(trainer.global_step, trainer.epoch + trainer.step_in_epoch / trainer.steps_per_epoch,
                      trainer.optimizer.param_groups[0]["lr"], bar)
        if cfg.ckpt_every_steps and trainer.global_step % cfg.ckpt_every_steps == 0 \
                and trainer.step_in_epoch < trainer.steps_per_epoch:
            trainer.save_checkpoint()
            log.restart_clock()  # a checkpoint's time is not training time
    bar.close()
