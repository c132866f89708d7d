"""Layouts for every attention kernel: the decomposed rows-then-columns passes and the rates' shapes.

Each backend is a *full-layout kernel*: ``kernel(q, k, v, rates, grid, distance)`` attends over all
L = H * W tokens of an H x W grid with q, k, v (B, n, L, d) and rates (B', n, L'), B' in {1, B},
L' in {1, L}, and returns (B, n, L, d) in q's dtype. ``attend`` runs such a kernel in either layout:

- "full": one call over the grid;
- "decomposed" (RMT's layout): one call over the rows, as B * H sequences on a 1 x W grid (the 1D
  distance |c_i - c_j| is the Manhattan distance on that line), then one over the columns of its
  output, as B * W sequences on a 1 x H grid.

The rates follow the tokens into each pass (``line_rates``); rates shared by the batch and the
tokens (per-head (1, n, 1)) serve both passes unchanged. Kernels over flat (S, L, d) sequences,
S = B * n, take their rates as (S, L) from ``flat_rates``.

Everything here is plain tensor reshaping that TorchScript can compile (the reference backend uses
it under ``torch.jit.script``), except ``attend``, which takes the kernel as an argument.
"""
from typing import Callable, Tuple

from torch import Tensor

Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tuple[int, int], str], Tensor]


def to_rows(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B, n, H*W, d) -> (B*H, n, W, d): one sequence per grid row."""
    return t.unflatten(2, grid).transpose(1, 2).flatten(0, 1)


def to_cols(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B, n, H*W, d) -> (B*W, n, H, d): one sequence per grid column."""
    return t.unflatten(2, grid).permute(0, 3, 1, 2, 4).flatten(0, 1)


def from_cols(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B*W, n, H, d) -> (B, n, H*W, d), the inverse of ``to_cols``.

    The result is a view of a token-major (B, H*W, n, d) tensor: the attention module merges the heads
    back into channels next, and that merge is then free instead of a second copy.
    """
    return t.unflatten(0, (-1, grid[1])).permute(0, 3, 1, 2, 4).flatten(1, 2).transpose(1, 2)


def rows_to_cols(t: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B*H, n, W, d) -> (B*W, n, H, d): the row pass's output as the column pass's input, in one copy
    (undoing the row layout and then taking the column layout makes two)."""
    return t.unflatten(0, (-1, grid[0])).permute(0, 3, 2, 1, 4).flatten(0, 1)


def line_rates(rates: Tensor, batch: int, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Rates of the row and the column pass of the decomposed layout.

    Shared per-head rates (1, n, 1) serve both passes as they are; any other (B', n, L') becomes
    per-token: row rates (B*H, n, W) and column rates (B*W, n, H), in the order of ``to_rows`` and
    ``to_cols``.
    """
    if rates.shape[0] == 1 and rates.shape[-1] == 1:
        return rates, rates
    height, width = grid
    heads = rates.shape[1]
    grid_rates = rates.expand(batch, heads, height * width).reshape(batch, heads, height, width)
    return (grid_rates.transpose(1, 2).reshape(batch * height, heads, width),
            grid_rates.permute(0, 3, 1, 2).reshape(batch * width, heads, height))


def flat_rates(rates: Tensor, batch: int, heads: int, tokens: int) -> Tensor:
    """(B', n, L') rates -> (B * n, L) float32, one row per flat sequence of (B * n, L, d) inputs.

    A view where the rates already are per token and image, a small copy otherwise; autograd sums
    the per-token gradient back to the broadcast shape.
    """
    return rates.float().expand(batch, heads, tokens).reshape(batch * heads, tokens)


def attend(kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], layout: str,
           distance: str) -> Tensor:
    """Run a full-layout ``kernel`` (module docstring) in ``layout``: (B, n, L, d) -> (B, n, L, d)."""
    if layout == "full":
        return kernel(q, k, v, rates, grid, distance)
    height, width = grid
    row_rates, col_rates = line_rates(rates, q.shape[0], grid)
    v_rows = kernel(to_rows(q, grid), to_rows(k, grid), to_rows(v, grid), row_rates, (1, width), distance)
    out = kernel(to_cols(q, grid), to_cols(k, grid), rows_to_cols(v_rows, grid), col_rates, (1, height), distance)
    return from_cols(out, grid)


__all__ = ["Kernel", "attend", "flat_rates", "from_cols", "line_rates", "rows_to_cols", "to_cols",
           "to_rows"]
