"""The chunked backend: exact full-2D spatial-decay attention without an (L, L) bias per head.

Queries are processed ``chunk`` rows at a time; the decay bias and the logits exist only for one
chunk, (B, n, chunk, L) floats. A custom autograd Function recomputes them in the backward pass
(flash-attention style), so training memory is O(B * n * chunk * L) on top of q, k, v instead of
O(B * n * L^2), and the gradient of the bias is reduced straight into the gradient of the rates:
rate s_i receives the row-i and the column-i terms of the symmetric bias. Each chunk holds whole
rows of the attention matrix, so the backward recomputes the softmax itself (bit-identical to the
forward's) rather than saving a logsumexp: nothing of size L^2 is saved.

Passes over chunk-sized memory, forward: the half-distance tile (one broadcast add of two small
per-line tables, shared by every image and head), the bias (a broadcast add of the rates and one
multiply by the tile, plus an ``abs``), one in-place GEMM adding
scale * q k^T onto it, one softmax, one GEMM with v. Backward: the same, then dP (GEMM), dS (two
passes), dq/dk/dv (GEMMs), and one multiply plus a row and a column sum for d(rates) (a single
matrix-vector product for per-head rates) after a ``sign`` pass. All chunk-sized results go into preallocated buffers.

The bias is ``-|(s_i + s_j) / 2 * dist_ij|`` (``sdt.decay``), with ``abs`` in the forward and
``-sign(s_i + s_j) * dist_ij / 2`` as its gradient (torch's convention sign(0) = 0), so values and
gradients match the reference for rates of any sign. (A shortcut for all-negative rates, which
skips those two passes, would need to look at the rates on the host: a GPU sync per call and a
graph break under torch.compile.)

Everything is computed in float32 (logits, softmax, accumulation); outputs and gradients are
cast back to the input dtypes.

Chunk size: ``chunk_rows`` picks the number of query rows so that one (B, n, chunk, L) float32
buffer holds about ``CHUNK_ELEMENTS`` (2^24 values, 64 MiB); forward and backward each hold two such
buffers, so the extra memory stays near 0.13 GiB whatever the resolution. Measured on the 2-core
CPU at the SDT-H-T stage-1 shape (docs/benchmarks.md): 2^22 and 2^24 are equally fast with one
thread, and 2^24 is 2x faster than 2^22 when the cores are shared (fewer, larger ops mean fewer
OpenMP barriers to wait on); 2^20 (cache-sized) is 1.5x slower, 2^25 slower again.
"""
from functools import partial
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..decay import line_distance
from ._layout import attend

CHUNK_ELEMENTS = 1 << 24


def chunk_rows(batch: int, heads: int, tokens: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Query rows per chunk so that a (batch, heads, rows, tokens) buffer has about ``budget`` elements."""
    return max(1, min(tokens, budget // max(1, batch * heads * tokens)))


class _Tiles:
    """Builds the logits and softmax of query chunks into two preallocated (B * n, chunk, L) buffers.

    Fresh multi-megabyte tensors per chunk cost a page fault per 4 KiB page on CPU (the allocator
    hands large blocks back to the OS), more than the arithmetic itself, so every chunk-sized
    result is written ``out=`` / in place into these two buffers.
    """

    def __init__(self, q: Tensor, k: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str, chunk: int):
        batch, heads, tokens, dim = q.shape
        self.q, self.k, self.rates = q, k, rates
        self.batch, self.heads, self.tokens, self.dim = batch, heads, tokens, dim
        self.scale = dim ** -0.5
        self.distance = distance
        self.per_token = rates.shape[-1] > 1
        height, width = grid
        index = torch.arange(tokens, device=q.device)
        self.grid_rows, self.grid_cols = index // width, index % width
        # |r_i - r_j| / 2 and |c_i - c_j| / 2 tables: a chunk's distance tile is one broadcast add of them
        self.row_half = line_distance(height, "manhattan", q.device).mul_(0.5)  # (H, H)
        self.col_half = line_distance(width, "manhattan", q.device).mul_(0.5)  # (W, W)
        size = batch * heads * min(chunk, tokens) * tokens
        self.logits_buffer = torch.empty(size, device=q.device)
        self.probs_buffer = torch.empty(size, device=q.device)
        self.tile_buffer = torch.empty(min(chunk, tokens) * tokens, device=q.device)

    def half_distance(self, start: int, stop: int) -> Tensor:
        """dist(i, j) / 2 for query tokens start..stop-1 against every token: (stop - start, L) float32."""
        rows = stop - start
        tile = self.tile_buffer[:rows * self.tokens].view(rows, self.tokens)
        if self.distance == "indicator":
            tile.fill_(0.5)
            tile[:, start:stop].fill_diagonal_(0.0)
            return tile
        torch.add(self.row_half[self.grid_rows[start:stop], :, None], self.col_half[self.grid_cols[start:stop], None, :],
                  out=tile.view(rows, self.row_half.shape[0], self.col_half.shape[0]))
        return tile

    def pair_rates(self, start: int, stop: int, out: Tensor) -> Tensor:
        """s_i + s_j for the chunk into ``out`` (B, n, c, L); per-head rates give (B', n, 1, 1) instead."""
        rates = self.rates.expand(self.batch, -1, -1)  # B' = 1 broadcasts over the batch
        if not self.per_token:
            return rates[..., None] * 2
        return torch.add(rates[..., start:stop, None], rates[..., None, :], out=out)

    def buffer(self, which: Tensor, rows: int) -> Tensor:
        return which[:self.batch * self.heads * rows * self.tokens].view(self.batch * self.heads, rows, self.tokens)

    def logits(self, start: int, stop: int, half_dist: Tensor) -> Tensor:
        """scale * q_c k^T + bias for the chunk: (B * n, c, L) float32 in the logits buffer."""
        rows = stop - start
        flat = self.buffer(self.logits_buffer, rows)
        bias = flat.view(self.batch, self.heads, rows, self.tokens)
        pair = self.pair_rates(start, stop, bias)
        if self.per_token:
            pair.abs_().neg_()
            bias.mul_(half_dist)
        else:
            torch.mul(-pair.abs(), half_dist, out=bias)
        q_chunk = self.q[:, :, start:stop].reshape(-1, rows, self.dim)
        k_t = self.k.view(-1, self.tokens, self.dim).transpose(1, 2)
        return flat.baddbmm_(q_chunk, k_t, alpha=self.scale)

    def probs(self, logits: Tensor) -> Tensor:
        """softmax over the last dim of ``logits`` into the probs buffer: (B * n, c, L)."""
        out = self.buffer(self.probs_buffer, logits.shape[1])
        return torch.ops.aten._softmax.out(logits, -1, False, out=out)


class ChunkedDecayAttention(torch.autograd.Function):
    """Exact full-2D decay attention, query-chunked; see the module docstring.

    forward(q, k, v, rates, grid, distance, chunk) with q, k, v (B, n, L, d) float32 contiguous,
    rates (B', n, L') float32 -> (B, n, L, d) float32.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int],
                distance: str, chunk: int) -> Tensor:
        batch, heads, tokens, dim = q.shape
        tiles = _Tiles(q, k, rates, grid, distance, chunk)
        out = torch.empty_like(q)
        v_flat = v.view(batch * heads, tokens, dim)
        for start in range(0, tokens, chunk):
            stop = min(tokens, start + chunk)
            probs = tiles.probs(tiles.logits(start, stop, tiles.half_distance(start, stop)))
            out[:, :, start:stop] = torch.bmm(probs, v_flat).view(batch, heads, -1, dim)
        ctx.save_for_backward(q, k, v, rates, out)
        ctx.grid, ctx.distance, ctx.chunk = grid, distance, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, rates, out = ctx.saved_tensors
        batch, heads, tokens, dim = q.shape
        flat = batch * heads
        need_q, need_k, need_v, need_rates = ctx.needs_input_grad[:4]
        tiles = _Tiles(q, k, rates, ctx.grid, ctx.distance, ctx.chunk)
        grad_out = grad_out.contiguous()
        q_flat, k_flat, v_flat = (t.view(flat, tokens, dim) for t in (q, k, v))
        v_t = v_flat.transpose(1, 2)
        delta = (grad_out * out).sum(-1).view(flat, tokens, 1)  # rowsum(dO * O) = rowsum(P * dP)
        grad_q = torch.empty_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_v = torch.zeros_like(v) if need_v else None
        # d loss / d(s_i + s_j), reduced to per-token (B, n, L) or per-head (B, n, 1) rates
        grad_pair = torch.zeros(batch, heads, tokens if tiles.per_token else 1, device=q.device)

        for start in range(0, tokens, ctx.chunk):
            stop = min(tokens, start + ctx.chunk)
            half_dist = tiles.half_distance(start, stop)
            # The softmax is recomputed from the logits: each chunk holds whole rows, so no
            # running max / logsumexp is needed and P is bit-identical to the forward's.
            logits = tiles.logits(start, stop, half_dist)
            probs = tiles.probs(logits)
            grad_out_chunk = grad_out[:, :, start:stop].reshape(flat, -1, dim)
            if need_v:
                grad_v.view(flat, tokens, dim).baddbmm_(probs.transpose(1, 2), grad_out_chunk)
            grad_logits = torch.bmm(grad_out_chunk, v_t, out=logits)  # dP, over the logits
            grad_logits.sub_(delta[:, start:stop]).mul_(probs)  # dS = P * (dP - delta)
            if need_q:
                grad_q[:, :, start:stop] = torch.bmm(grad_logits, k_flat).mul_(tiles.scale).view(batch, heads, -1, dim)
            if need_k:
                grad_k.view(flat, tokens, dim).baddbmm_(grad_logits.transpose(1, 2), q_flat[:, start:stop],
                                                        alpha=tiles.scale)
            if need_rates:
                # d bias / d(s_i + s_j) = -sign(s_i + s_j) * dist / 2
                grad_bias = grad_logits.view(batch, heads, -1, tokens)
                if tiles.per_token:
                    sign = tiles.pair_rates(start, stop, probs.view(batch, heads, -1, tokens)).sign_()
                    grad_bias.mul_(sign).neg_()
                    grad_bias.mul_(half_dist)
                    grad_pair[:, :, start:stop] += grad_bias.sum(-1)
                    grad_pair += grad_bias.sum(-2)
                else:
                    summed = torch.mv(grad_logits.view(flat, -1), half_dist.reshape(-1)).view(batch, heads, 1)
                    grad_pair -= summed * torch.sign(rates)

        grad_rates = None
        if need_rates:
            # per-head rates: s_i + s_j = 2 s, so both terms land on the same rate
            grad_rates = grad_pair if tiles.per_token else 2 * grad_pair
            if rates.shape[0] != batch:
                grad_rates = grad_rates.sum(0, keepdim=True)
        return grad_q, grad_k, grad_v, grad_rates, None, None, None


def chunked_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str,
                   chunk: Optional[int] = None) -> Tensor:
    """The full-layout kernel (``sdt.backends._layout``) through ``ChunkedDecayAttention``.

    Computes in float32; ``chunk`` overrides ``chunk_rows``. Returns (B, n, L, d) in q's dtype.
    """
    batch, heads, tokens, _ = q.shape
    chunk = chunk or chunk_rows(batch, heads, tokens)
    q32, k32, v32 = (t.float().contiguous() for t in (q, k, v))
    out = ChunkedDecayAttention.apply(q32, k32, v32, rates.float(), tuple(grid), distance, chunk)
    return out.to(q.dtype)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], layout: str,
                      distance: str, chunk: Optional[int] = None) -> Tensor:
    """Spatial-decay attention, exact, without materialising the (L, L) bias of the full layout.

    Same arguments and result as ``reference_attention`` (rates not None); ``chunk`` overrides
    ``chunk_rows``. The decomposed layout runs its row and column passes through the same
    Function (``sdt.backends._layout``): this keeps the gradient of trained rates out of
    autograd's bias graph and SDPA's math kernel.

    Returns:
        (B, n, L, d) in q's dtype.
    """
    return attend(partial(chunked_kernel, chunk=chunk), q, k, v, rates, grid, layout, distance)
