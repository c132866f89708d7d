"""Shared helpers: a tiny fake Fashion-MNIST on disk and a tiny model, so training tests take seconds; a
recorder of the ops a block of code dispatches."""
import gzip
import socket
import struct
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# A ~10k-parameter SDT-H (same code path as sdt_h_nano) on 16x16 inputs.
TINY_MODEL = [
    "model.kwargs={embed_dims: [8, 16, 16, 16], depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], projection_dim: 16}",
    "model.drop_path_rate=0.0",
    "data.input_size=16",
]


def free_port() -> int:
    """A TCP port free right now, for torchrun's rendezvous (fixed ports collide with other runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 60, labels_mod: int = 10) -> Path:
    """IDX files in Fashion-MNIST's layout; image i is class i % 10 with a class-dependent bright band."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % labels_mod
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * (label % 10):2 * (label % 10) + 6, :] += 150
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    return write_fake_fashion_mnist(tmp_path / "fmnist")


def tiny_overrides(data_dir: Path, **extra: str) -> List[str]:
    """Overrides for a seconds-long run of the quick recipe on ``data_dir``."""
    values = {
        "data.data_dir": str(data_dir), "data.val_size": "40", "data.train_subset": "null", "data.val_subset": "null",
        "data.workers": "0", "engine.batch_size": "16", "engine.epochs": "2", "engine.threads": "1",
        "engine.log_every_steps": "2", "engine.ckpt_every_steps": "3", "engine.warmup_epochs": "0.5",
    }
    values.update(extra)
    return TINY_MODEL + [f"{k}={v}" for k, v in values.items()]


# The test machine is small and shared: one intra-op thread avoids OpenMP oversubscription, which
# made tiny element-wise ops ~50x slower under load.
torch.set_num_threads(1)


class RecordOps(TorchDispatchMode):
    """Inside ``with RecordOps() as record:`` every op dispatched below autograd, in order: ``record.ops``
    (OpOverloads), ``record.names`` (``"aten.addmm"``, ``"mkldnn._linear_pointwise"``) and ``record.outputs``."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.outputs: list = []

    @property
    def names(self) -> List[str]:
        return [str(op.overloadpacket) for op in self.ops]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        self.outputs.append(out)
        return out
