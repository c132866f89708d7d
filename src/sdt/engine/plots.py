"""The PNGs a run writes: training curves, confusion matrices, sample grids. Every file is written
atomically (temp file + rename), so a killed process never leaves half a PNG.

matplotlib is imported inside each function (with the Agg backend), so ``import sdt`` stays light.
"""
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Union

import numpy as np
from torch import Tensor

from ..files import atomic_path

if TYPE_CHECKING:
    import matplotlib.figure

PathLike = Union[str, Path]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: "matplotlib.figure.Figure", path: PathLike, dpi: int) -> None:
    """Write a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def plot_curves(records: Sequence[Dict[str, Any]], out_path: PathLike, metric: str) -> None:
    """One PNG with three panels: losses, learning rate, and the validation ``metric`` per epoch.
    ``records``: a run's metrics.jsonl (``sdt.engine.read_metrics``)."""
    plt = _pyplot()
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train loss")
    for prefix in ("", "ema_"):
        if evals and prefix + "loss" in evals[0]:
            axes[0].plot([r["epoch"] for r in evals], [r[prefix + "loss"] for r in evals], "o-", label=f"val loss {prefix.rstrip('_')}".strip())
        if evals and prefix + metric in evals[0]:  # a task may score without a validation loss (detection mAP)
            axes[2].plot([r["epoch"] for r in evals], [r[prefix + metric] for r in evals], "o-", label=f"val {metric} {prefix.rstrip('_')}".strip())
    axes[1].plot([r["epoch"] for r in train], [r["lr"] for r in train])
    for ax, title in zip(axes, ("loss", "learning rate", f"validation {metric}")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)


def plot_confusion(confusion: Tensor, classes: List[str], path: PathLike, title: str) -> None:
    """Row-normalised confusion matrix (K, K) [true, predicted] as a PNG."""
    plt = _pyplot()
    k = len(classes)
    norm = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * k + 2), max(4, 0.5 * k + 1.5)))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def image_grid(images: Tensor, rows: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (rows*(H+1)-1, cols*(W+1)-1[, C]) uint8 array, row-major, 1 px black gaps
    (torchvision's ``make_grid`` without its outer border)."""
    from torchvision.utils import make_grid

    cols = -(-len(images) // rows)
    array = make_grid(images, nrow=cols, padding=1)[:, 1:-1, 1:-1].permute(1, 2, 0).numpy()
    return array[..., 0] if images.shape[1] == 1 else array  # make_grid repeats grey images to 3 channels


def save_image_grid(images: Tensor, rows: int, path: PathLike) -> None:
    """``image_grid(images, rows)`` as a PNG (uint8, grey or RGB), written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image_grid(images, rows)).save(tmp, format="PNG")
