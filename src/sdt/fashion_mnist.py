"""Fashion-MNIST from its IDX files, as uint8 tensors (the only data the generation code needs).

Default location: /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``).
"""
import gzip
import os
from typing import Tuple

import torch
from torch import Tensor

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: str) -> Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != torch.Size(shape).numel():
        raise ValueError(f"{path} is truncated: header says {shape}, body has {len(body)} bytes")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str = DEFAULT_DIR) -> Tuple[Tensor, Tensor]:
    """Returns images (N, 1, 28, 28) uint8 and labels (N,) int64; split "train" (60k) or "test" (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing: install it with 'sudo apt-get install dataset-fashion-mnist' "
                f"or pass the folder holding the IDX .gz files with --data-dir")
    images, labels = (_read_idx(p) for p in paths)
    return images.unsqueeze(1), labels.long()
