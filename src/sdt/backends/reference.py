"""The reference backend: materialise the decay bias and hand it to SDPA as an additive mask.

It is the ground truth every other backend is tested against, and the path used by TorchScript,
torch.fx and ONNX export. Memory is O(n * L^2) per image for the full 2D layout.

When a bias is present and q is in reduced precision, attention runs in float32 so that the
float32 bias is added to float32 logits (an fp16/bf16 mask would round away long-distance decay).
"""
from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..decay import full_2d_bias
from ._layout import from_cols, line_rates, rows_to_cols, to_cols, to_rows


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """SDPA over (N, n, m, d) inputs with an optional float32 (N', n, m, m) additive bias."""
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    out_dtype = q.dtype
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    return out.to(out_dtype)


def reference_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Optional[Tensor], grid: Tuple[int, int],
                     distance: str) -> Tensor:
    """The full-layout kernel (``sdt.backends._layout``): SDPA with the (B', n, L, L) bias of ``full_2d_bias``."""
    bias = None if rates is None else full_2d_bias(rates, grid[0], grid[1], distance)
    return _sdpa(q, k, v, bias)


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
    if layout == "full":
        return reference_kernel(q, k, v, rates, grid, distance)
    # the decomposed passes of sdt.backends._layout.attend, spelled out: TorchScript takes no kernel argument
    row_rates: Optional[Tensor] = None
    col_rates: Optional[Tensor] = None
    if rates is not None:
        row_rates, col_rates = line_rates(rates, q.shape[0], grid)
    v_rows = reference_kernel(to_rows(q, grid), to_rows(k, grid), to_rows(v, grid), row_rates, (1, grid[1]), distance)
    out = reference_kernel(to_cols(q, grid), to_cols(k, grid), rows_to_cols(v_rows, grid), col_rates, (1, grid[0]),
                           distance)
    return from_cols(out, grid)
