"""Attention backends for spatial-decay attention, behind one function.

``spatial_decay_attention`` is the only entry point the model code calls. Each backend takes the
same arguments (see ``reference.reference_attention``) and computes the same result; they differ
in speed, memory and where they run.

| backend     | where                                  | memory (full layout)      | notes                                  |
|-------------|----------------------------------------|---------------------------|----------------------------------------|
| reference   | everywhere; TorchScript, fx, ONNX      | O(B n L^2) bias (+ grads) | materialised bias + SDPA; ground truth |
| chunked     | CPU and GPU, forward and backward      | O(B n chunk L)            | exact; custom autograd, query chunks   |
| fused       | CPU, forward and backward              | O(threads * 2^17)         | C++ kernel built on first use          |
| flex        | forward CPU/GPU, backward GPU only     | O(B n L d)                | FlexAttention score_mod, compiled      |

``rates=None`` uses plain SDPA in every backend. The decomposed layout's biases are only (W, W)
and (H, H) per row and column; ``chunked`` and ``fused`` run its two passes as attention over
1 x W and 1 x H grids, ``flex`` hands it to the reference. ``fused`` (``fused.py``) does the
whole attention, forward and backward, per cache-sized block of query rows; when the kernel cannot
be built (no C++ compiler) it warns once and runs the chunked Function instead.

``backend="auto"`` decides per call, from the measurements in docs/benchmarks.md (2-core CPU).
"Bias elements" is the size the reference would materialise, B' * n * L^2 (B' = 1 for rates
shared by the batch, as fixed and learned per-head rates are); "fixed" means per-head rates
that need no gradient (RMT's decay, or any frozen per-head rates):

| condition (first match)                                            | backend   |
|--------------------------------------------------------------------|-----------|
| TorchScript scripting or tracing, fx tracing, torch.compile        | reference |
| no decay (``rates is None``)                                       | reference |
| fixed, full layout, bias elements <= 2^25 (128 MiB)                | reference |
| fixed, decomposed layout, off the CPU or a grid side longer than 28 | reference |
| CPU, training or inference                                         | fused     |
| decomposed layout                                                  | chunked   |
| bias elements <= 2^20 (4 MiB)                                      | reference |
| CUDA                                                               | flex      |
| otherwise                                                          | chunked   |

Why: a fixed per-head bias is one (n, L, L) tensor that SDPA adds cheaply (reference is 1.2-1.7x
faster than chunked at the stage-2, stage-3 and DiT shapes, on par with fused). A per-token or
trained bias is (B, n, L, L) and sends SDPA to its math kernel. On the CPU the fused kernel is
the fastest or tied at every SDT-H-T stage shape and the DiT shape, in both layouts: inference
about 1x plain SDPA's time at stages 1 and 2 where chunked takes about 2x, training on par with
chunked at stage 1 and up to 1.5x faster at the smaller grids, where chunked pays Python
overhead per chunk. Off the CPU, chunked is 1.3-5x faster than the reference for training from
the 14x14 grid up (SDT-H-T stage 3) and needs 0.13 GiB instead of 5 GiB at stage 1. In the
decomposed layout a trained bias also sends SDPA to its math kernel and autograd through the bias
construction, which the chunked Function avoids. The decomposed layout is never replaced by the
full one (or back), even at 7x7 where one full attention is cheaper than two decomposed passes:
they are different functions, and a model's layout is its own choice (``layouts=``,
``sdt_h_*_full2d``).

Fixed rates in the decomposed layout make a bias of only (n, W, W) per row pass, so the
reference pays for SDPA's separate passes rather than for the bias. On the CPU the fused kernel
is 1.05-1.7x faster there at grid sides 7 to 28 (SDT-H-T stages 2 and 4 at batch 8, the nano
stages on 28x28 images at batch 128, forward and forward+backward), while at 56 (SDT-H-T stage
1) the reference trains 1.3x faster; hence the side limit of 28.

``flex`` is never chosen on CPU: it has no CPU backward (forcing it there with a gradient needed
raises an error naming ``chunked``), and its forward compiles a kernel per new shape (about a
minute on a 2-core CPU). Its CUDA choice is by design, not measured: no GPU was available while
this was built (``chunked`` also runs on CUDA, equally untested there).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import reference_attention

BACKENDS = ("auto", "reference", "chunked", "fused", "flex")
LAYOUTS = ("full", "decomposed")
# Largest materialised bias (B' * n * L^2 elements) for which "auto" keeps the reference backend:
# for untrained per-head rates, and for everything else (see the table above).
REFERENCE_MAX_FIXED_ELEMENTS = 1 << 25
REFERENCE_MAX_ELEMENTS = 1 << 20
# Longest grid side up to which the fused CPU kernel beats the reference for fixed rates in the
# decomposed layout (1.05-1.7x at sides 7-28; at 56 the reference trains 1.3x faster).
FUSED_MAX_FIXED_DECOMPOSED_SIDE = 28


def check_backend(backend: str) -> str:
    """Validate a backend name, with a message that lists the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_backend(q: Tensor, rates: Optional[Tensor], grid: Tuple[int, int], layout: str) -> str:
    """The backend ``auto`` runs for these inputs (see the table in the module docstring)."""
    if rates is None:
        return "reference"
    _, heads, tokens, _ = q.shape
    on_cpu = q.device.type == "cpu"
    if rates.shape[-1] == 1 and not _needs_grad(rates):  # fixed
        if layout == "full" and rates.shape[0] * heads * tokens * tokens <= REFERENCE_MAX_FIXED_ELEMENTS:
            return "reference"
        if layout != "full" and not (on_cpu and max(grid) <= FUSED_MAX_FIXED_DECOMPOSED_SIDE):
            return "reference"
    if on_cpu:
        return "fused"
    if layout != "full":
        return "chunked"
    if rates.shape[0] * heads * tokens * tokens <= REFERENCE_MAX_ELEMENTS:
        return "reference"
    return "flex" if q.device.type == "cuda" else "chunked"


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()


@torch.jit.unused
def _eager_attention(q: Tensor, k: Tensor, v: Tensor, rates: Optional[Tensor], grid: Tuple[int, int],
                     layout: str, distance: str, backend: str) -> Tensor:
    from .chunked import chunked_attention
    from .flex import flex_decay_attention

    if backend == "auto":
        backend = "reference" if _tracing() else choose_backend(q, rates, grid, layout)
    if backend in ("chunked", "fused"):
        return chunked_attention(q, k, v, rates, grid, layout, distance, fused=backend == "fused")
    if backend == "flex":
        return flex_decay_attention(q, k, v, rates, grid, layout, distance)
    return reference_attention(q, k, v, rates, grid, layout, distance)


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
