"""Processes, data order and RNG state: torch.distributed set-up, the resumable sampler and the
in-order evaluation loader, and the RNG states a checkpoint saves and restores.

Exact resume rests here: the data order of an epoch is a function of (seed, epoch)
(``ResumableSampler``), augmentation is seeded per sample (``sdt.data.ImageSamples``), and a
checkpoint holds every RNG state of the loop (``rng_state`` / ``set_rng_state``).
"""
import ctypes
import ctypes.util
import os
import platform
import random
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data import Batch, collate
from ..errors import ConfigError


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


# glibc's mallopt parameters (malloc.h), and the environment variables through which a user sets them instead
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Keep the memory that tensors free in this process for the next ones, instead of returning it to the OS.

    glibc's malloc serves large blocks with mmap and hands freed memory back to the OS, so a model with
    large, short-lived activations page-faults every page of them in again on each call: ``sdt_h_tiny`` at
    224 px, batch 16, took 88-123k page faults per forward pass, 16% of its float32 inference time on a 2-core
    VM (docs/benchmarks.md, section 5). With higher mmap and trim thresholds freed blocks stay in the heap
    and are reused; peak memory is the same, but the process keeps it until it exits.

    Does nothing outside Linux with glibc (other allocators, such as jemalloc or tcmalloc, reuse freed memory
    already) or when the user set glibc's malloc variables (``MALLOC_*_``, ``GLIBC_TUNABLES``) themselves.
    Returns whether it changed the settings.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _GLIBC_MALLOC_ENV):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # glibc refuses an mmap threshold above its largest heap's half (32 MiB on most builds): then take that
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return bool(mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Start torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU), and keep freed memory
    for reuse (``keep_freed_memory``)."""
    keep_freed_memory()
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



def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch and CUDA RNG states, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def all_rng_states(dist_info: DistInfo) -> List[Dict[str, Any]]:
    """Every process's ``rng_state``, in rank order (each process gets them all)."""
    state = rng_state()
    if not dist_info.distributed:
        return [state]
    states: List[Any] = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (a new run; a resumed one restores them instead)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def usable_batches(window: List[Batch], dist_info: DistInfo) -> List[Batch]:
    """The micro-batches of one step that every process can train on. A process whose micro-batch
    lost all its images (unreadable files) cannot join that backward pass's gradient all-reduce,
    so all processes drop that micro-batch together instead of waiting for each other forever."""
    has_images = torch.tensor([len(b.images) > 0 for b in window], dtype=torch.int32, device=dist_info.device)
    if dist_info.distributed:
        dist.all_reduce(has_images, op=dist.ReduceOp.MIN)
    return [b for b, ok in zip(window, has_images.tolist()) if ok]


def broadcast_buffers(modules: List[nn.Module], dist_info: DistInfo) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics): DDP broadcasts buffers before a
    forward pass, not after, so each process ends training with the statistics of its own batches."""
    if dist_info.distributed:
        for module in modules:
            for buffer in unwrap(module).buffers():
                dist.broadcast(buffer, src=0)


def distribute(model: nn.Module, dist_info: DistInfo, sync_bn: bool) -> nn.Module:
    """``model`` in DDP when several processes train (its BatchNorms synchronised with ``sync_bn``), else itself."""
    if not dist_info.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
