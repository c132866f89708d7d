"""The Triton backend: spatial-decay attention in fused GPU kernels, forward and backward.

softmax(q k^T * d^-0.5 + bias) v with bias(i, j) = -|(s_i + s_j) / 2 * dist(i, j)| (``sdt.decay``),
flash-attention style: the logits exist only as (BLOCK_M, BLOCK_N) tiles in registers, the
distance is computed in the kernel from the token indices (Manhattan |r_i - r_j| + |c_i - c_j| on
an H x W raster grid with r = i // W, c = i % W, or the indicator i != j), and the forward keeps
only the log-sum-exp of each row. Extra memory is O(S * L) whatever the grid.

Kernels (S sequences of L tokens, head dim d; one program per block and sequence):

- forward: a block of queries runs over all key blocks with an online softmax -> out, lse;
- backward, as FlashAttention-2 splits it, after delta = rowsum(dO * O):
  a key-block pass (dk, dv, and the column sums of the rate gradient for those keys) and a
  query-block pass (dq, and the row sums, added to the column sums and stored). Each program owns
  the rows it writes, so there are no atomics and the results do not depend on scheduling.

The rate gradient: d(bias_ij)/d(s_i) = d(bias_ij)/d(s_j) = -sign(pair_ij) * dist_ij / 2 with
pair = (s_i + s_j) / 2 * dist and torch's sign(0) = 0, so with g_ij = dS_ij * that factor,
d(s_t) = sum_j g_tj (t as a query: row sum) + sum_i g_it (t as a key: column sum).

Arithmetic: every dot accumulates in float32 and the softmax runs in float32. float32 inputs use
``input_precision`` for the dots ("tf32", the GPU default, differs from float32 by about 1e-3;
"ieee" for exact checks); bf16/fp16 inputs use native tensor-core dots, with P and dS rounded to
the input dtype before their products with v, dO, k and q (as FlashAttention does).

Layouts: the kernels take the full layout of one (H, W) grid per sequence. The decomposed layout
runs its row and column passes as batches of 1 x W and 1 x H sequences through the same kernels.

Block sizes: ``triton.autotune`` over the small tables below, keyed on (L, d), with configs whose
blocks exceed the (padded) sequence pruned. Head dims are padded to a power of two >= 16 (tl.dot's
minimum) under masks, up to 128. Under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` itself is first imported, and torch._dynamo imports it; it runs the kernels on CPU
tensors, for tests: see tests/backends/test_triton.py) one fixed configuration, ``FIXED_CONFIG``, is used
instead: autotuning there would run every config.
The tables are educated guesses (FlashAttention-2's Triton tutorial uses 128 x 64 forward tiles,
and 32 x 128 / 128 x 32 for the two backward passes) and have not been measured on a GPU yet.
"""
import contextlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner
except ImportError as error:  # CPU-only installs of torch come without triton
    raise ImportError("sdt.backends.triton needs the 'triton' package, which CUDA builds of torch install "
                      "('pip install triton'); on CPU use backend='fused' or 'chunked'") from error


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads its settings there
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed when the kernels below are decorated: triton.jit reads TRITON_INTERPRET at that moment.
INTERPRET = _interpreting()
# (BLOCK_M, BLOCK_N, warps, stages) for every kernel instead of autotuning, or None to autotune.
# Set under the interpreter (where autotuning would run every config; 32 x 32 gives the test
# grids partial blocks) and by the tests that check each table entry on a GPU.
FIXED_CONFIG: Optional[Tuple[int, int, int, int]] = (32, 32, 4, 1) if INTERPRET else None
PRECISIONS = ("tf32", "ieee")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 128
LOG2E = tl.constexpr(1.4426950408889634)  # kernels may only read constexpr globals
LN2 = tl.constexpr(0.6931471805599453)


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in table]


# (BLOCK_M queries, BLOCK_N keys, warps, stages). The pass's own block (queries forward and in
# the query pass, keys in the key pass) is the large one; the loop runs over the small one.
FORWARD_TABLE = [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 2, 2)]
KEY_PASS_TABLE = [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 2, 2)]
QUERY_PASS_TABLE = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 2, 2)]


def _prune_to_sequence(configs, named_args, **kwargs):
    """Drop configs whose blocks are larger than the sequence (padded to a power of two, >= 32)."""
    limit = max(32, triton.next_power_of_2(named_args["seq_len"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit and c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[-1:]


def _tuned(table):
    if INTERPRET:
        return lambda kernel: kernel
    return triton.autotune(_configs(table), key=["seq_len", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _prune_to_sequence})


@triton.jit
def _decay_tile(index_a, index_b, rate_a, rate_b, width, INDICATOR: tl.constexpr, RATES_GRAD: tl.constexpr):
    """|pair| = |(s_a + s_b) / 2 * dist| for a (len(a), len(b)) tile (symmetric in a and b), and with
    RATES_GRAD sign(pair) * dist (sign(0) = 0): d(bias)/d(s_a) = d(bias)/d(s_b) = -1/2 of it."""
    if INDICATOR:
        dist = (index_a[:, None] != index_b[None, :]).to(tl.float32)
    else:
        row_a, col_a = index_a // width, index_a % width
        row_b, col_b = index_b // width, index_b % width
        dist = (tl.abs(row_a[:, None] - row_b[None, :]) + tl.abs(col_a[:, None] - col_b[None, :])).to(tl.float32)
    pair = (rate_a[:, None] + rate_b[None, :]) * 0.5 * dist
    factor = dist
    if RATES_GRAD:
        factor = ((pair > 0).to(tl.float32) - (pair < 0).to(tl.float32)) * dist
    return tl.abs(pair), factor


@triton.jit
def _sequence_block(R, stride_r0, stride_r1, rate_inner, seq_len, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """This program's block of one sequence: its token offsets and mask, the channel offsets and mask,
    the sequence's offset into (S, L, d) and into (S, L) tensors, and the pointer to its rates."""
    seq = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    base = seq.to(tl.int64) * seq_len * HEAD_DIM
    row_base = seq.to(tl.int64) * seq_len
    rates = R + (seq // rate_inner).to(tl.int64) * stride_r0 + (seq % rate_inner).to(tl.int64) * stride_r1
    return offs, offs < seq_len, offs_d, offs_d < HEAD_DIM, base, row_base, rates


@triton.jit
def _load_rows(A, B, offs, mask, offs_d, mask_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``offs`` of two (L, d) matrices, zero-padded to (len(offs), D_PAD)."""
    offsets = offs[:, None] * HEAD_DIM + offs_d[None, :]
    tile_mask = mask[:, None] & mask_d[None, :]
    a = tl.load(A + offsets, mask=tile_mask, other=0.0)
    b = tl.load(B + offsets, mask=tile_mask, other=0.0)
    if UPCAST:  # the interpreter's bf16/fp16 dots are wrong: compute in float32 there
        a, b = a.to(tl.float32), b.to(tl.float32)
    return a, b


@_tuned(FORWARD_TABLE)
@triton.jit
def _forward_kernel(Q, K, V, R, Out, Lse, stride_r0, stride_r1, stride_rl, rate_inner, seq_len, width, scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INDICATOR: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m, mask_m, offs_d, mask_d, base, row_base, rates = _sequence_block(R, stride_r0, stride_r1, rate_inner, seq_len,
                                                                            HEAD_DIM, D_PAD, BLOCK_M)

    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    rate_m = tl.load(rates + offs_m * stride_rl, mask=mask_m, other=0.0)
    scale_log2 = scale * LOG2E
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        k, v = _load_rows(K + base, V + base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM, UPCAST)
        rate_n = tl.load(rates + offs_n * stride_rl, mask=mask_n, other=0.0)
        abs_pair, _ = _decay_tile(offs_m, offs_n, rate_m, rate_n, width, INDICATOR, False)
        # logits in log2 units, so that exp2 serves as exp
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - abs_pair * LOG2E
        logits = tl.where(mask_n[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))  # finite: every key block has a valid key
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    acc = acc / row_sum[:, None]
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + row_base + offs_m, (row_max + tl.log2(row_sum)) * LN2, mask=mask_m)


@triton.jit
def _delta_kernel(Out, DO, Delta, seq_len, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) in float32: (S, L)."""
    seq = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask, mask_d = offs < seq_len, offs_d < HEAD_DIM
    base = seq.to(tl.int64) * seq_len * HEAD_DIM
    out, grad_out = _load_rows(Out + base, DO + base, offs, mask, offs_d, mask_d, HEAD_DIM, True)
    tl.store(Delta + seq.to(tl.int64) * seq_len + offs, tl.sum(out * grad_out, 1), mask=mask)


@_tuned(KEY_PASS_TABLE)
@triton.jit
def _backward_key_kernel(Q, K, V, R, DO, Lse, Delta, DK, DV, DRateCols, stride_r0, stride_r1, stride_rl, rate_inner,
                         seq_len, width, scale,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INDICATOR: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr, RATES_GRAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of keys over every query block, in transposed (key, query) tiles: dk, dv, column sums."""
    offs_n, mask_n, offs_d, mask_d, base, row_base, rates = _sequence_block(R, stride_r0, stride_r1, rate_inner, seq_len,
                                                                            HEAD_DIM, D_PAD, BLOCK_N)

    k, v = _load_rows(K + base, V + base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM, UPCAST)
    rate_n = tl.load(rates + offs_n * stride_rl, mask=mask_n, other=0.0)
    scale_log2 = scale * LOG2E
    grad_k = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    grad_v = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    grad_rate = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seq_len
        q, grad_out = _load_rows(Q + base, DO + base, offs_m, mask_m, offs_d, mask_d, HEAD_DIM, UPCAST)
        rate_m = tl.load(rates + offs_m * stride_rl, mask=mask_m, other=0.0)
        lse_m = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E
        delta_m = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
        abs_pair, factor = _decay_tile(offs_n, offs_m, rate_n, rate_m, width, INDICATOR, RATES_GRAD)
        logits = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - abs_pair * LOG2E
        p = tl.where(mask_m[None, :], tl.exp2(logits - lse_m[None, :]), 0.0)  # P^T: (keys, queries)
        grad_v += tl.dot(p.to(grad_out.dtype), grad_out, input_precision=PRECISION)
        grad_p = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION)
        grad_s = p * (grad_p - delta_m[None, :])
        grad_k += tl.dot(grad_s.to(q.dtype), q, input_precision=PRECISION)
        if RATES_GRAD:
            grad_rate += tl.sum(grad_s * factor, 1)
    out_offsets = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + base + out_offsets, (grad_k * scale).to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(DV + base + out_offsets, grad_v.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    if RATES_GRAD:
        tl.store(DRateCols + row_base + offs_n, grad_rate * -0.5, mask=mask_n)


@_tuned(QUERY_PASS_TABLE)
@triton.jit
def _backward_query_kernel(Q, K, V, R, DO, Lse, Delta, DQ, DRateCols, DRates, stride_r0, stride_r1, stride_rl,
                           rate_inner, seq_len, width, scale,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INDICATOR: tl.constexpr,
                           PRECISION: tl.constexpr, UPCAST: tl.constexpr, RATES_GRAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of queries over every key block: dq, and d(rates) = row sums + the key pass's column sums."""
    offs_m, mask_m, offs_d, mask_d, base, row_base, rates = _sequence_block(R, stride_r0, stride_r1, rate_inner, seq_len,
                                                                            HEAD_DIM, D_PAD, BLOCK_M)

    q, grad_out = _load_rows(Q + base, DO + base, offs_m, mask_m, offs_d, mask_d, HEAD_DIM, UPCAST)
    rate_m = tl.load(rates + offs_m * stride_rl, mask=mask_m, other=0.0)
    lse_m = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E
    delta_m = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    scale_log2 = scale * LOG2E
    grad_q = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    grad_rate = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        k, v = _load_rows(K + base, V + base, offs_n, mask_n, offs_d, mask_d, HEAD_DIM, UPCAST)
        rate_n = tl.load(rates + offs_n * stride_rl, mask=mask_n, other=0.0)
        abs_pair, factor = _decay_tile(offs_m, offs_n, rate_m, rate_n, width, INDICATOR, RATES_GRAD)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - abs_pair * LOG2E
        # padded keys have k = 0, so exp2 could overflow there: mask P, not only the logits
        p = tl.where(mask_n[None, :], tl.exp2(logits - lse_m[:, None]), 0.0)
        grad_p = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
        grad_s = p * (grad_p - delta_m[:, None])
        grad_q += tl.dot(grad_s.to(k.dtype), k, input_precision=PRECISION)
        if RATES_GRAD:
            grad_rate += tl.sum(grad_s * factor, 1)
    tl.store(DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], (grad_q * scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    if RATES_GRAD:
        columns = tl.load(DRateCols + row_base + offs_m, mask=mask_m, other=0.0)
        tl.store(DRates + row_base + offs_m, grad_rate * -0.5 + columns, mask=mask_m)


def _grid(sequences: int, tokens: int, block: str):
    # sequences on axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535): the decomposed layout
    # runs many short sequences
    return lambda meta: (sequences, triton.cdiv(tokens, meta[block]))


def _launch(kernel, grid, *args, tuned: bool = True, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) on the tensors' device; a tuned kernel gets FIXED_CONFIG if set."""
    if tuned and FIXED_CONFIG is not None:
        block_m, block_n, warps, stages = FIXED_CONFIG
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        if isinstance(kernel, Autotuner):
            kernel = kernel.fn
    device = args[0].device
    # Triton launches on the current device: make it the tensors' (they may be on cuda:1)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **constexprs)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, height: int, width: int,
                  input_precision: str) -> Tensor:
    """Validate the (S, L, d) inputs; returns rates as an (S0, S1, L) view with S0 * S1 = S (no copy)."""
    if q.dim() != 3:
        raise ValueError(f"triton attention takes (S, L, d) q, k, v; got q of shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    sequences, tokens, dim = q.shape
    if height * width != tokens or height < 1 or width < 1:
        raise ValueError(f"grid {height} x {width} does not hold the sequence of L = {tokens} tokens")
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel; "
                         "use backend='chunked'")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision={input_precision!r}: expected one of {PRECISIONS}")
    if rates.dtype != torch.float32:
        raise TypeError(f"rates must be float32 (decay biases are kept in float32); got {rates.dtype}")
    if not INTERPRET and q.device.type != "cuda":
        raise RuntimeError(f"the Triton kernels need CUDA tensors and these are on {q.device.type}: use backend="
                           "'fused' or 'chunked' there (tests: set TRITON_INTERPRET=1 before importing "
                           "sdt.backends.triton to run the kernels in Triton's CPU interpreter)")
    if rates.device != q.device:
        raise ValueError(f"rates are on {rates.device} and q on {q.device}")
    try:
        if rates.dim() == 2:
            return rates.expand(sequences, tokens).unsqueeze(1)
        if rates.dim() == 3 and rates.shape[0] * rates.shape[1] == sequences:
            return rates.expand(rates.shape[0], rates.shape[1], tokens)
    except RuntimeError:
        pass
    raise ValueError(f"rates of shape {tuple(rates.shape)} do not fit: expected (S, L) = ({sequences}, {tokens}) "
                     "(size-1 dims broadcast) or (S0, S1, L) with S0 * S1 = S")


def _common(q: Tensor, rates: Tensor, height: int, width: int, indicator: bool, input_precision: str):
    sequences, tokens, dim = q.shape
    args = (rates.stride(0), rates.stride(1), rates.stride(2), rates.shape[1], tokens, width, dim ** -0.5)
    constexprs = dict(HEAD_DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)), INDICATOR=bool(indicator),
                      PRECISION=input_precision if q.dtype == torch.float32 else "tf32",  # the dot default; ignored for bf16/fp16
                      UPCAST=INTERPRET and q.dtype != torch.float32)
    return sequences, tokens, args, constexprs


def triton_forward(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, height: int, width: int, indicator: bool,
                   input_precision: str = "tf32") -> Tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + bias) v and each row's natural log-sum-exp.

    Args:
        q, k, v: (S, L, d) float32, bfloat16 or float16 on CUDA (made contiguous here), L = height * width.
        rates: (S, L) float32, or (S0, S1, L) with S0 * S1 = S (sequence s uses rates[s // S1, s % S1]);
            any strides, including 0 (expanded views are read in place, not copied).
        indicator: distance i != j instead of the Manhattan distance.
        input_precision: "tf32" or "ieee" for float32 dots (ignored for bf16/fp16 inputs).

    Returns:
        out (S, L, d) in q's dtype, lse (S, L) float32.
    """
    rates = _check_inputs(q, k, v, rates, height, width, input_precision)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    sequences, tokens, args, constexprs = _common(q, rates, height, width, indicator, input_precision)
    out = torch.empty_like(q)
    lse = torch.empty(sequences, tokens, device=q.device, dtype=torch.float32)
    _launch(_forward_kernel, _grid(sequences, tokens, "BLOCK_M"), q, k, v, rates, out, lse, *args, **constexprs)
    return out, lse


def triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, rates: Tensor, lse: Tensor,
                    height: int, width: int, indicator: bool, input_precision: str = "tf32",
                    rates_grad: bool = True) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of ``triton_forward`` given grad_out and its out and lse.

    Args: as ``triton_forward``, plus grad_out and out (S, L, d) and lse (S, L) float32;
        ``rates_grad=False`` skips the rate gradient (returned as None).

    Returns:
        dq, dk, dv (S, L, d) in the input dtype; d(rates) (S, L) float32 per token (sum it back to a
        broadcast rates shape yourself).
    """
    rates = _check_inputs(q, k, v, rates, height, width, input_precision)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:2]:
        raise ValueError(f"grad_out and out must be {tuple(q.shape)} and lse {tuple(q.shape[:2])}")
    q, k, v, out, lse = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    sequences, tokens, args, constexprs = _common(q, rates, height, width, indicator, input_precision)
    delta = torch.empty(sequences, tokens, device=q.device, dtype=torch.float32)
    delta_block = 64
    _launch(_delta_kernel, (sequences, triton.cdiv(tokens, delta_block)), out, grad_out, delta, tokens,
            tuned=False, HEAD_DIM=q.shape[2], D_PAD=constexprs["D_PAD"], BLOCK=delta_block)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if rates_grad:
        rate_cols = torch.empty(sequences, tokens, device=q.device, dtype=torch.float32)
        grad_rates = torch.empty_like(rate_cols)
    else:  # never read or written: RATES_GRAD=False compiles the rate gradient away
        rate_cols = grad_rates = delta
    _launch(_backward_key_kernel, _grid(sequences, tokens, "BLOCK_N"), q, k, v, rates, grad_out, lse, delta,
            grad_k, grad_v, rate_cols, *args, RATES_GRAD=rates_grad, **constexprs)
    _launch(_backward_query_kernel, _grid(sequences, tokens, "BLOCK_M"), q, k, v, rates, grad_out, lse, delta,
            grad_q, rate_cols, grad_rates, *args, RATES_GRAD=rates_grad, **constexprs)
    return grad_q, grad_k, grad_v, grad_rates if rates_grad else None


__all__ = ["triton_forward", "triton_backward", "INTERPRET"]
