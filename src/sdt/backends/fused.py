"""The fused CPU backend: spatial-decay attention in a C++ kernel, forward and backward.

The chunked backend makes five passes over each (B, n, chunk, L) tile in main memory. This kernel
(``fused_cpu.cpp``) gives each thread a block of query rows (or a group of short sequences) whose
logits fit in its cache and does everything there: forward q k^T, bias, softmax (keeping the
log-sum-exp of each row), product with v; backward recomputes P from the log-sum-exp and forms
dP, dS = P * (dP - rowsum(dO * O)), dq, dk, dv and the rate gradient (row i and column i of the
symmetric bias) in one pass per block. Each backward task owns whole sequences, so dk, dv and
d(rates) accumulate without atomics. Nothing of size L^2 reaches main memory: the extra memory is
O(threads * TASK_ELEMENTS) plus an (S, L) log-sum-exp.

The C++ source is built and loaded by ``fused_cpu.py`` and called through the custom op
``sdt::spatial_decay_attention`` (``ops.py``), which gives it autograd and a fake implementation
for ``torch.compile``. Where the kernel cannot be built, this backend runs the chunked one.
"""
from typing import Tuple

from torch import Tensor

from .fused_cpu import available
from .ops import op_kernel


def fused_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str) -> Tensor:
    """The full-layout kernel (``sdt.backends._layout``) of this backend: the custom op ``sdt::spatial_decay_attention``
    (``ops.py``) on the C++ kernel, or ``chunked_kernel`` when the kernel is unavailable.

    Args:
        q, k, v: (B, n, L, d) on the CPU.
        rates: (B', n, L') float32 with B' in {1, B}, L' in {1, L}.

    Returns:
        (B, n, L, d) in q's dtype.
    """
    if q.device.type != "cpu":
        raise RuntimeError(f"backend='fused' is a CPU kernel and the inputs are on {q.device.type}: "
                           "use backend='triton' (CUDA), 'chunked', 'flex' or 'auto' there")
    if not available():
        from .chunked import chunked_kernel

        return chunked_kernel(q, k, v, rates, grid, distance)
    return op_kernel(q, k, v, rates, grid, distance)
