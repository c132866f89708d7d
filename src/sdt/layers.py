"""Building blocks of the fast path that the attention module and the models share, each the same
value as the plain torch code it replaces (issue 30, docs/benchmarks.md section 5):

- ``add_into``: a residual addition written into a fresh tensor instead of a new one;
- ``depthwise_residual``: a depthwise conv on channels-last activations plus a residual, through the
  ``sdt::depthwise_conv`` op on the CPU;
- ``linear_act``: a linear layer, optionally followed by GELU, as oneDNN's fused GEMM in float32
  CPU inference.

Each branches on the device, dtype or grad mode, so torch.fx treats them as leaves: the callers
register them with ``torch.fx.wrap`` in their own modules, and timm's tracer learns them here.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import flop_registry, register_flop_formula

from timm.layers import register_notrace_function

from .backends import _portable_trace
from .backends import fused_cpu
from .backends.ops import depthwise_conv_op


def add_into(update: Tensor, residual: Tensor) -> Tensor:
    """residual + update, written into ``update`` where the dtypes and shapes agree (else a new tensor).

    ``update`` must be a fresh result whose producer's backward does not read it (a conv, a Linear,
    layerscale, drop path): autograd then allows the in-place addition, which saves allocating and
    filling a new tensor of the activation's size. Same value as ``residual + update``.
    """
    if update.dtype == residual.dtype and update.shape == residual.shape:
        return update.add_(residual)
    return residual + update


@torch.jit.unused
def _depthwise_kernel_applies(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> bool:
    """Whether ``sdt::depthwise_conv`` computes conv(x) + residual: a depthwise, stride-1, "same" conv with an
    odd square kernel on the CPU with the C++ kernel built, x and residual of one float32/bf16 dtype (the
    plain path's dtype too), outside autocast's bf16 casts (the op keeps x's dtype) and the portable traces."""
    channels, kernel = conv.in_channels, conv.kernel_size[0]
    return (conv.groups == channels == conv.out_channels and conv.kernel_size == (kernel, kernel) and kernel % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (kernel // 2, kernel // 2)
            and conv.padding_mode == "zeros" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and residual.dtype == x.dtype and residual.shape == x.shape and x.stride(-1) == 1
            and not (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"))
            and not _portable_trace() and fused_cpu.available())


def depthwise_residual(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
    """residual + conv(x) for channels-last x, residual (B, H, W, C) and a depthwise ``conv``: -> (B, H, W, C).

    On the CPU the custom op ``sdt::depthwise_conv`` (oneDNN's convolution with the residual added into
    its output, and the weight and bias gradients from the C++ kernel: oneDNN's depthwise backward was
    the slow part of a training step), else ``conv`` on the NCHW view (channels-last memory) with the
    residual added into its output. TorchScript takes no module
    argument: scripted callers spell the plain path out under ``torch.jit.is_scripting()``.
    """
    if _depthwise_kernel_applies(conv, x, residual):
        return depthwise_conv_op(x, conv.weight, conv.bias, residual)
    return add_into(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), residual)


# oneDNN's linear with the bias and GELU applied in the GEMM's epilogue. ATen's addmm first copies the
# bias into the whole output, and a separate GELU reads and writes it again: at SDT-H-T's stage-1
# shapes (50k rows) that is 1.6x the time of the fused GEMM (docs/benchmarks.md section 5). It has no
# autograd, so it serves float32 inference only.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
LINEAR_ACTIVATIONS = ("none", "gelu")


@torch.jit.unused
def _onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``linear_act`` runs oneDNN's fused linear: float32 on the CPU with nothing that needs a gradient,
    outside autocast (whose casts the op would skip), ``torch.compile`` (inductor packs its own GEMMs) and
    the portable traces."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    return (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and weight.dim() == 2 and x.numel() > 0
            and not needs_grad and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not _portable_trace())


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str = "none") -> Tensor:
    """``F.linear(x, weight, bias)``, then exact GELU if ``activation == "gelu"``: (..., K) -> (..., N).

    Float32 inference on the CPU runs oneDNN's linear with the bias and the activation fused into the GEMM
    (``_onednn_linear_applies``); everything else, training included, the plain ops. Same values up to
    float rounding.
    """
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {LINEAR_ACTIVATIONS}")
    if not torch.jit.is_scripting() and _onednn_linear_applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out


if _ONEDNN_LINEAR and torch.ops.mkldnn._linear_pointwise.default not in flop_registry:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """FlopCounterMode (``sdt.models.complexity``) knows no oneDNN op: count the GEMM inside it."""
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


for _function in (add_into, depthwise_residual, linear_act):
    register_notrace_function(_function)
del _function

__all__ = ["LINEAR_ACTIVATIONS", "add_into", "depthwise_residual", "linear_act"]
