"""The reference backend: materialise the decay bias and hand it to SDPA as an additive mask.

It is the ground truth every other backend is tested against, and the path used by TorchScript,
torch.fx and ONNX export. Memory is O(n * L^2) per image for the full 2D layout.

When a bias is present and q is in reduced precision, attention runs in float32 so that the
float32 bias is added to float32 logits (an fp16/bf16 mask would round away long-distance decay).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decay import decomposed_biases, full_2d_bias


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """SDPA over (N, n, m, d) inputs with an optional float32 (N', n, m, m) additive bias."""
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    out_dtype = q.dtype
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    return out.to(out_dtype)


def to_rows(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B, n, H*W, d) -> (B*H, n, W, d): one sequence per grid row."""
    return t.unflatten(2, grid).transpose(1, 2).flatten(0, 1)


def to_cols(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B, n, H*W, d) -> (B*W, n, H, d): one sequence per grid column."""
    return t.unflatten(2, grid).permute(0, 3, 1, 2, 4).flatten(0, 1)


def from_rows(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B*H, n, W, d) -> (B, n, H*W, d), the inverse of ``to_rows``."""
    return t.unflatten(0, (-1, grid[0])).transpose(1, 2).flatten(2, 3)


def from_cols(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B*W, n, H, d) -> (B, n, H*W, d), the inverse of ``to_cols``."""
    return t.unflatten(0, (-1, grid[1])).permute(0, 2, 3, 1, 4).flatten(2, 3)


def reference_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rates: Optional[Tensor],
        grid: Tuple[int, int],
        layout: str,
        distance: str,
) -> Tensor:
    """Spatial-decay attention with a materialised bias.

    Args:
        q, k, v: (B, n, L, d), rotary already applied; logits are scaled by d^-0.5 here.
        rates: (B', n, L') float32 decay rates (see ``sdt.decay``) or None for no decay.
        grid: (H, W) with H * W == L.
        layout: "full" (one attention over all L tokens) or "decomposed" (rows, then columns).
        distance: "manhattan" or "indicator".

    Returns:
        (B, n, L, d)
    """
    height, width = grid
    if layout == "full":
        bias = None if rates is None else full_2d_bias(rates, height, width, distance)
        return _sdpa(q, k, v, bias)

    row_bias: Optional[Tensor] = None
    col_bias: Optional[Tensor] = None
    if rates is not None:
        if rates.shape[0] != 1 or rates.shape[-1] != 1:  # anything but shared per-head rates: one per token
            rates = rates.expand(q.shape[0], q.shape[1], q.shape[2])
        row_bias, col_bias = decomposed_biases(rates, height, width, distance)
        row_bias = row_bias.flatten(0, 1)  # (B'*H', n, W, W)
        col_bias = col_bias.flatten(0, 1)  # (B'*W', n, H, H)

    v_rows = from_rows(_sdpa(to_rows(q, grid), to_rows(k, grid), to_rows(v, grid), row_bias), grid)
    return from_cols(_sdpa(to_cols(q, grid), to_cols(k, grid), to_cols(v_rows, grid), col_bias), grid)
