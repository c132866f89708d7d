"""Attention backends for spatial-decay attention, behind one function.

``spatial_decay_attention`` is the only entry point the model code calls. Every backend is a
full-layout kernel with one signature, ``kernel(q, k, v, rates, grid, distance)``, run in the
full or the decomposed layout by ``_layout.attend`` (the row and column passes are batches of
1 x W and 1 x H sequences through the same kernel); they compute the same result and differ in
speed, memory and where they run.

| backend   | where                              | memory (full layout)      | notes                                  |
|-----------|------------------------------------|---------------------------|----------------------------------------|
| reference | everywhere; TorchScript, fx, ONNX  | O(B n L^2) bias (+ grads) | materialised bias + SDPA; ground truth |
| chunked   | CPU and GPU, forward and backward  | O(B n chunk L)            | exact; custom autograd, query chunks   |
| fused     | CPU, forward and backward          | O(threads * 2^17)         | C++ kernel built on first use          |
| triton    | CUDA, forward and backward         | O(B n L)                  | Triton kernels (``triton.py``)         |
| flex      | forward CPU/GPU, backward GPU only | O(B n L d)                | FlexAttention score_mod, compiled      |

``fused`` and ``triton`` are one custom op, ``sdt::spatial_decay_attention`` (``ops.py``), with
its autograd and a fake implementation: ``torch.compile`` traces models through it with no graph
break and nothing of size L^2. ``fused`` falls back to ``chunked`` (with a warning) where the C++
kernel cannot be built. ``rates=None`` is plain SDPA (the reference backend) everywhere.

``backend="auto"`` decides per call. "Bias elements" is the size the reference would materialise,
B' * n * L^2 (B' = 1 for rates shared by the batch, as fixed and learned per-head rates are);
"fixed" means per-head rates that need no gradient (RMT's decay, or frozen per-head rates). The
CPU thresholds are measured on a 2-core CPU (docs/benchmarks.md, "Why the dispatch"); **the
CUDA rules are by design and unmeasured**: no GPU was available while this was built.

| condition (first match)                                             | backend   |
|---------------------------------------------------------------------|-----------|
| TorchScript scripting or tracing, fx symbolic tracing, ONNX export  | reference |
| no decay (``rates is None``)                                        | reference |
| CUDA, Triton importable                                             | triton    |
| fixed, CPU, full layout of at most 64 tokens                        | reference |
| fixed, CPU, decomposed layout with no grid side longer than 4       | reference |
| fixed, off the CPU, full layout, bias elements <= 2^25 (128 MiB)    | reference |
| fixed, off the CPU, decomposed layout                               | reference |
| CPU, training or inference                                          | fused     |
| decomposed layout                                                   | chunked   |
| bias elements <= 2^20 (4 MiB)                                       | reference |
| CUDA (no Triton)                                                    | flex      |
| otherwise                                                           | chunked   |

``torch.compile`` follows the same table: on CPU it traces the fused custom op (or the chunked
Function where the C++ kernel is unavailable), on CUDA the Triton one.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import fused
from ._layout import attend
from .chunked import chunked_kernel
from .ops import op_kernel
from .reference import reference_attention, reference_kernel

BACKENDS = ("auto", "reference", "chunked", "fused", "triton", "flex")
LAYOUTS = ("full", "decomposed")
# Largest materialised bias (B' * n * L^2 elements) for which "auto" keeps the reference backend off the
# CPU: for untrained per-head rates, and for everything else (see the table above).
REFERENCE_MAX_FIXED_ELEMENTS = 1 << 25
REFERENCE_MAX_ELEMENTS = 1 << 20
# Fixed rates on the CPU: the fused kernel is 1.1-2.9x faster than the reference (SDPA with the bias as
# its mask) at every SDT-H-T stage, DiT and nano shape, inference and training, except where both take
# about a millisecond: full grids up to 8x8 (0.93-1.0x) and decomposed lines up to 4 long (0.85x in
# training). Measured 2026-12-06 on the vectorised kernel (docs/benchmarks.md, "Why the dispatch").
REFERENCE_MAX_FIXED_FULL_TOKENS_CPU = 64
REFERENCE_MAX_FIXED_DECOMPOSED_SIDE_CPU = 4


def check_backend(backend: str) -> str:
    """Validate a backend name, with a message that lists the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.compiler.assume_constant_result  # a constant for torch.compile, checked once at trace time
def triton_available() -> bool:
    """Whether the Triton backend imports (the ``triton`` package, which CUDA builds of torch bring)."""
    try:
        from . import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(q: Tensor, rates: Optional[Tensor], grid: Tuple[int, int], layout: str) -> str:
    """The backend ``auto`` runs for these inputs (see the table in the module docstring)."""
    if rates is None:
        return "reference"
    device = q.device.type
    if device == "cuda" and triton_available():
        return "triton"
    _, heads, tokens, _ = q.shape
    if rates.shape[-1] == 1 and not _needs_grad(rates):  # fixed
        if device == "cpu":
            if layout == "full" and tokens <= REFERENCE_MAX_FIXED_FULL_TOKENS_CPU:
                return "reference"
            if layout != "full" and max(grid) <= REFERENCE_MAX_FIXED_DECOMPOSED_SIDE_CPU:
                return "reference"
        elif layout != "full" or rates.shape[0] * heads * tokens * tokens <= REFERENCE_MAX_FIXED_ELEMENTS:
            return "reference"
    if device == "cpu":
        return "fused"
    if layout != "full":
        return "chunked"
    if rates.shape[0] * heads * tokens * tokens <= REFERENCE_MAX_ELEMENTS:
        return "reference"
    return "flex" if device == "cuda" else "chunked"


def _portable_trace() -> bool:
    """Tracing that must record plain torch ops (no custom op, no autograd.Function): reference only."""
    return (torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            or torch.onnx.is_in_onnx_export())


def triton_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str) -> Tensor:
    """The full-layout kernel of the ``triton`` backend: the custom op on CUDA tensors (``ops.py``)."""
    if q.device.type != "cuda":
        raise RuntimeError(f"backend='triton' runs on CUDA and the inputs are on {q.device.type}: "
                           "use backend='fused' (CPU), 'chunked' or 'auto' there")
    return op_kernel(q, k, v, rates, grid, distance)


def _flex_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str) -> Tensor:
    from .flex import flex_kernel  # imports FlexAttention only when asked for

    return flex_kernel(q, k, v, rates, grid, distance)


KERNELS = {
    "reference": reference_kernel,
    "chunked": chunked_kernel,
    "fused": fused.fused_kernel,
    "triton": triton_kernel,
    "flex": _flex_kernel,
}


@torch.jit.unused
def _eager_attention(q: Tensor, k: Tensor, v: Tensor, rates: Optional[Tensor], grid: Tuple[int, int],
                     layout: str, distance: str, backend: str) -> Tensor:
    if backend == "auto":
        backend = "reference" if _portable_trace() else choose_backend(q, rates, grid, layout)
    if rates is None or backend == "reference":
        return reference_attention(q, k, v, rates, grid, layout, distance)
    return attend(KERNELS[backend], q, k, v, rates, grid, layout, distance)


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
        backend: one of ``BACKENDS``; "auto" picks per call (module docstring).

    Returns:
        (B, n, L, d)
    """
    if torch.jit.is_scripting():
        return reference_attention(q, k, v, rates, grid, layout, distance)
    check_backend(backend)
    return _eager_attention(q, k, v, rates, grid, layout, distance, backend)
