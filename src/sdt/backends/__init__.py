"""Attention backends for spatial-decay attention, behind one function.

``spatial_decay_attention`` is the only entry point the model code calls. Each backend takes the
same arguments (see ``reference.reference_attention``) and computes the same result.

| backend     | where                       | notes                                             |
|-------------|-----------------------------|---------------------------------------------------|
| reference   | everywhere; TorchScript/fx  | materialised bias + SDPA; the ground truth        |

``backend="auto"`` picks per call; scripting and tracing always use ``reference``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import reference_attention

BACKENDS = ("auto", "reference")
LAYOUTS = ("full", "decomposed")


def check_backend(backend: str) -> str:
    """Validate a backend name, with a message that lists the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def spatial_decay_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rates: Optional[Tensor],
        grid: Tuple[int, int],
        layout: str = "full",
        distance: str = "manhattan",
        backend: str = "auto",
) -> Tensor:
    """softmax(q k^T / sqrt(d) + decay_bias) v over an H x W token grid.

    Args:
        q, k, v: (B, n, L, d) with L = H * W in raster order, rotary already applied.
        rates: (B', n, L') float32 decay rates, B' in {1, B}, L' in {1, L}; None: no decay.
        grid: (H, W).
        layout: "full" (2D Manhattan decay over all tokens) or "decomposed" (rows, then columns).
        distance: "manhattan" or "indicator" (the content-only ablation).
        backend: one of ``BACKENDS``.

    Returns:
        (B, n, L, d)
    """
    return reference_attention(q, k, v, rates, grid, layout, distance)
