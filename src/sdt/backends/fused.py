"""A fused C++ forward for CPU inference with full-2D (or line) spatial decay.

The chunked backend's forward makes five passes over each (B, n, chunk, L) tile in main memory.
This kernel (``fused_cpu.cpp``) gives each thread a group of sequences or a block of query rows
whose logits fit in its cache, and computes q k^T, the bias, the softmax and the product with v
there: one GEMM, two passes over cached logits, one GEMM. Forward only; ``chunked`` calls it
when no gradient is needed and falls back to its own loop when the kernel is unavailable.

The kernel is compiled on first use with ``torch.utils.cpp_extension.load`` (about a minute;
cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), with
``-march=native``: the build is for the machine it runs on. ``SDT_FUSED=0`` disables it (and
``SDT_FUSED=1`` makes a failed build an error instead of a warning).
"""
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# logits per task, in float32 elements: 2^17 (512 KiB, half this machine's 1 MiB L2). At the stage-1
# shape 2^16 and 2^18 were within 5% of it, 2^14 1.9x slower (docs/benchmarks.md).
TASK_ELEMENTS = 1 << 17
_module = None
_failed: Optional[str] = None


def _setting() -> str:
    value = os.environ.get("SDT_FUSED", "auto").lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"SDT_FUSED={value!r}: expected 0 (off), 1 (required) or auto")
    return value


def load():
    """The compiled extension module, building it on first use; None when disabled or the build failed."""
    global _module, _failed
    setting = _setting()
    if setting == "0" or _failed is not None:
        return None
    if _module is None:
        from torch.utils import cpp_extension

        log.info("building sdt's fused CPU attention kernel (once per machine, about a minute)")
        try:
            cpp_extension.load(
                name="sdt_fused_cpu",
                sources=[str(Path(__file__).with_name("fused_cpu.cpp"))],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            _module = torch.ops.sdt_fused
        except Exception as error:  # no compiler, no headers, ...: fall back, once, loudly
            _failed = f"{type(error).__name__}: {error}"
            if setting == "1":
                raise RuntimeError("SDT_FUSED=1 but the fused CPU kernel failed to build: " + _failed
                                   + " (install a C++ compiler, e.g. 'apt-get install g++', or unset SDT_FUSED)") from error
            warnings.warn("sdt: the fused CPU attention kernel failed to build, using the slower chunked loop "
                          "(set SDT_FUSED=0 to silence this): " + _failed.splitlines()[0])
            return None
    return _module


def fused_forward(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: tuple, distance: str,
                  task_elements: int = TASK_ELEMENTS) -> Optional[Tensor]:
    """softmax(q k^T / sqrt(d) + bias) v without autograd, or None when the kernel is unavailable.

    Args:
        q, k, v: (B, n, L, d) float32 on the CPU.
        rates: (B', n, L') float32 with B' in {1, B}, L' in {1, L}.

    Returns:
        (B, n, L, d) float32, or None.
    """
    module = load()
    if module is None:
        return None
    batch, heads, tokens, dim = q.shape
    flat_rates = rates.float().expand(batch, heads, tokens).reshape(batch * heads, tokens).contiguous()
    out = module.decay_attention_forward(
        *(t.reshape(batch * heads, tokens, dim).contiguous() for t in (q, k, v)), flat_rates,
        grid[0], grid[1], distance == "indicator", task_elements)
    return out.view(batch, heads, tokens, dim)
