"""The flex backend: FlexAttention with the decay bias computed inside the kernel by a ``score_mod``.

``score - |(s_i + s_j) / 2 * dist(i, j)|`` is evaluated per score from the rates and the grid
coordinates, so no (L, L) tensor exists at all. ``torch.compile`` turns it into one fused kernel
(Triton on GPU, C++/OpenMP on CPU); the first call for a new shape compiles (tens of seconds on a
CPU), later calls reuse the kernel.

Where it runs: forward on CPU and GPU, backward on GPU only. PyTorch's CPU FlexAttention has no
backward, so the dispatch never picks ``flex`` on CPU when a gradient is needed, and forcing it
there raises an error that names the alternatives. On CUDA it is the fallback when the Triton
backend is unavailable, and a comparison in the benchmarks.

The backward: FlexAttention differentiates the ``score_mod`` per score, and the gradient of a
captured tensor indexed twice (``rates[q_idx] + rates[kv_idx]``) is not supported by its lowering
(inductor's ``validate_joint_graph`` raises). The key side therefore reads a clone of the rates
(one (B, n, L) copy); the rate gradient is accumulated with one atomic add per score.
"""
from typing import Tuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from ._layout import attend

_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def decay_score_mod(rates: Tensor, grid: Tuple[int, int], distance: str):
    """A FlexAttention ``score_mod`` adding -|(s_i + s_j) / 2 * dist(i, j)| to each score.

    Args:
        rates: (B, n, L) float32 (expand per-head or shared rates before calling).
        grid: (H, W) with H * W == L, raster order.
        distance: "manhattan" or "indicator".
    """
    index = torch.arange(grid[0] * grid[1], device=rates.device)
    rows, cols = index // grid[1], index % grid[1]
    # a second tensor for the key side: FlexAttention's backward cannot index one grad-requiring tensor twice
    key_rates = rates.clone() if rates.requires_grad else rates

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if distance == "indicator":
            dist = (q_idx != kv_idx).to(torch.float32)
        else:
            dist = ((rows[q_idx] - rows[kv_idx]).abs() + (cols[q_idx] - cols[kv_idx]).abs()).to(torch.float32)
        pair = (rates[b, h, q_idx] + key_rates[b, h, kv_idx]) * 0.5
        return score - (pair * dist).abs()

    return score_mod


def flex_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str,
                compiled: bool = True) -> Tensor:
    """The full-layout kernel (``sdt.backends._layout``) through FlexAttention.

    ``compiled=False`` runs FlexAttention eagerly (slow, materialises the scores; for tests).

    Returns:
        (B, n, L, d) in q's dtype.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rates))
    if q.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "backend='flex' has no backward pass on CPU (PyTorch's CPU FlexAttention is inference-only); "
            "use backend='fused' or 'chunked' (exact, memory-lean) or 'auto' for training on CPU, "
            "or run the forward under torch.no_grad()")
    batch, heads, tokens, _ = q.shape
    rates = rates.float().expand(batch, heads, tokens)
    attend_flex = _flex() if compiled else flex_attention
    # logits in float32 like the other backends, so the float32 bias keeps its precision
    out = attend_flex(q.float(), k.float(), v.float(), score_mod=decay_score_mod(rates, grid, distance))
    return out.to(q.dtype)


def flex_decay_attention(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], layout: str,
                         distance: str, compiled: bool = True) -> Tensor:
    """Spatial-decay attention through FlexAttention; same arguments and result as ``reference_attention``
    (rates not None). ``compiled``: see ``flex_kernel``.

    Returns:
        (B, n, L, d) in q's dtype.
    """
    return attend(lambda *args: flex_kernel(*args, compiled=compiled), q, k, v, rates, grid, layout, distance)
