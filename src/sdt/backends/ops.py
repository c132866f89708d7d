"""The memory-lean spatial-decay attention as ``torch.library`` custom ops: C++ on CPU, Triton on CUDA.

softmax(q k^T * d^-0.5 + bias) v over S flat sequences of L = height * width tokens, with
bias(i, j) = -|(s_i + s_j) / 2 * dist(i, j)| (``sdt.decay``) computed inside the kernel:

- ``torch.ops.sdt.spatial_decay_attention(q, k, v, rates, height, width, indicator) -> (out, lse)``
- ``torch.ops.sdt.spatial_decay_attention_backward(grad_out, q, k, v, out, rates, lse, height,
  width, indicator, rates_grad) -> (dq, dk, dv, drates)``

q, k, v, out: (S, L, d) of one dtype; rates: (S, L) float32 (any strides); lse, drates: (S, L)
float32 (drates is empty when ``rates_grad`` is False). The forward op carries its autograd
(``register_autograd``: the backward op, with the rate gradient only when the rates need one)
and a fake implementation (``register_fake``), so ``torch.compile`` traces it as one opaque node
in the forward and one in the backward graph: no graph break, and nothing of size L^2 anywhere.
``lse`` is saved for the backward and is not differentiable.

Kernels: on CPU the fused C++ kernel (``fused_cpu.py`` builds it; float32 and bfloat16 q/k/v as they are, with
float32 logits, bias and accumulation, so bf16 autocast has no float32 round trip; other dtypes are
computed in float32 and cast back), on CUDA the Triton kernels (``triton.py``, imported on first
CUDA use), whose float32 dots follow ``torch.get_float32_matmul_precision()`` ("highest": exact
"ieee" dots, else TF32).
"""
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from . import fused_cpu
from ._layout import flat_rates

# q/k/v dtypes the C++ kernel takes as they are; anything else is computed in float32 and cast back.
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_ops():
    ops = fused_cpu.load()
    if ops is None:
        raise RuntimeError("the fused CPU attention kernel is not built (SDT_FUSED=0 or a failed build): "
                           "use backend='chunked' or 'auto', which falls back to it")
    return ops


def _cpu_inputs(*tensors: Tensor) -> Tuple[Tensor, ...]:
    dtype = tensors[0].dtype if tensors[0].dtype in CPU_KERNEL_DTYPES else torch.float32
    return tuple(t.to(dtype).contiguous() for t in tensors)


def _on_triton(q: Tensor) -> bool:
    """CUDA tensors, or CPU tensors while ``sdt.backends.triton`` runs in Triton's interpreter
    (``TRITON_INTERPRET=1``: how the Triton tests reach the kernels through this op without a GPU)."""
    triton_module = sys.modules.get("sdt.backends.triton")
    return q.device.type == "cuda" or q.device.type == "cpu" and bool(getattr(triton_module, "INTERPRET", False))


def _triton_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@torch.library.custom_op("sdt::spatial_decay_attention", mutates_args=())
def spatial_decay_attention_op(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, height: int, width: int,
                               indicator: bool) -> Tuple[Tensor, Tensor]:
    """(S, L, d) q, k, v and (S, L) float32 rates -> out (S, L, d) in q's dtype, lse (S, L) float32."""
    if _on_triton(q):
        from .triton import triton_forward

        return triton_forward(q, k, v, rates, height, width, indicator, input_precision=_triton_precision())
    if q.device.type != "cpu":
        raise RuntimeError(f"sdt::spatial_decay_attention runs on CPU and CUDA, not {q.device.type}")
    q_, k_, v_ = _cpu_inputs(q, k, v)
    out, lse = _cpu_ops().forward(q_, k_, v_, rates.float().contiguous(), height, width, indicator, fused_cpu.TASK_ELEMENTS)
    return out.to(q.dtype), lse


@spatial_decay_attention_op.register_fake
def _(q, k, v, rates, height, width, indicator):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("sdt::spatial_decay_attention_backward", mutates_args=())
def spatial_decay_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, rates: Tensor,
                                        lse: Tensor, height: int, width: int, indicator: bool,
                                        rates_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``spatial_decay_attention_op``: dq, dk, dv (S, L, d) in q's dtype, drates (S, L) float32."""
    if _on_triton(q):
        from .triton import triton_backward

        dq, dk, dv, drates = triton_backward(grad_out, q, k, v, out, rates, lse, height, width, indicator,
                                             input_precision=_triton_precision(), rates_grad=rates_grad)
        return dq, dk, dv, drates if rates_grad else rates.new_empty(0)
    if q.device.type != "cpu":
        raise RuntimeError(f"sdt::spatial_decay_attention_backward runs on CPU and CUDA, not {q.device.type}")
    # the C++ kernel forms the rate gradient in the same pass as dq, so it always returns one
    args = _cpu_inputs(grad_out, q, k, v, out)
    dq, dk, dv, drates = _cpu_ops().backward(*args, rates.float().contiguous(), lse.contiguous(), height, width,
                                             indicator, fused_cpu.TASK_ELEMENTS)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), drates if rates_grad else rates.new_empty(0)


@spatial_decay_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, rates, lse, height, width, indicator, rates_grad):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    return (*grads, q.new_empty(q.shape[:2] if rates_grad else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, rates, height, width, indicator = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, rates, lse)
    ctx.height, ctx.width, ctx.indicator = height, width, indicator
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, rates, lse = ctx.saved_tensors
    rates_grad = ctx.needs_input_grad[3]
    dq, dk, dv, drates = spatial_decay_attention_backward_op(grad_out, q, k, v, out, rates, lse, ctx.height, ctx.width,
                                                             ctx.indicator, rates_grad)
    return dq, dk, dv, drates if rates_grad else None, None, None, None


spatial_decay_attention_op.register_autograd(_backward, setup_context=_setup_context)


def op_kernel(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, grid: Tuple[int, int], distance: str) -> Tensor:
    """The full-layout kernel (``sdt.backends._layout``) over the custom op: (B, n, L, d) -> (B, n, L, d).

    rates (B', n, L') are broadcast to one row per sequence here, so autograd sums their
    per-token gradient back to their shape; k and v are cast to q's dtype.
    """
    batch, heads, tokens, dim = q.shape
    flat = [t.to(q.dtype).reshape(batch * heads, tokens, dim) for t in (q, k, v)]
    out, _ = spatial_decay_attention_op(*flat, flat_rates(rates, batch, heads, tokens), grid[0], grid[1],
                                        distance == "indicator")
    return out.view(batch, heads, tokens, dim)


@torch.library.custom_op("sdt::rotary_heads", mutates_args=())
def rotary_heads_op(x: Tensor, sin: Tensor, cos: Tensor, groups: int, heads: int) -> Tensor:
    """Rotary embedding and head layout in one pass: (B, L, G * n * d) -> (G, B, n, L, d) contiguous.

    x: q and k side by side (G = 2), e.g. a slice of the fused projection's output (unit last stride);
    sin, cos: (L, d) float32 (``sdt.attention.rotary_tables``). Equal to ``apply_rotary`` on each
    (B, n, L, d) head view, computed in float32 and rounded once to x's dtype.
    """
    if x.device.type == "cuda":
        from .triton import triton_rotary_heads

        return triton_rotary_heads(x, sin, cos, groups, heads)
    if x.device.type != "cpu":
        raise RuntimeError(f"sdt::rotary_heads runs on CPU and CUDA, not {x.device.type}")
    return _cpu_ops().rotary_heads(x, sin.float().contiguous(), cos.float().contiguous(), groups, heads)


@rotary_heads_op.register_fake
def _(x, sin, cos, groups, heads):
    batch, tokens, channels = x.shape
    return x.new_empty(groups, batch, heads, tokens, channels // (groups * heads))


@torch.library.custom_op("sdt::rotary_heads_backward", mutates_args=())
def rotary_heads_backward_op(grad: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """The gradient of ``rotary_heads_op``: (G, B, n, L, d) -> (B, L, G * n * d), the transposed rotation."""
    if grad.device.type == "cuda":
        from .triton import triton_rotary_heads_backward

        return triton_rotary_heads_backward(grad, sin, cos)
    if grad.device.type != "cpu":
        raise RuntimeError(f"sdt::rotary_heads_backward runs on CPU and CUDA, not {grad.device.type}")
    return _cpu_ops().rotary_heads_backward(grad, sin.float().contiguous(), cos.float().contiguous())


@rotary_heads_backward_op.register_fake
def _(grad, sin, cos):
    groups, batch, heads, tokens, dim = grad.shape
    return grad.new_empty(batch, tokens, groups * heads * dim)


def _rotary_setup_context(ctx, inputs, output):
    _, sin, cos, _, _ = inputs
    ctx.save_for_backward(sin, cos)


def _rotary_backward(ctx, grad: Tensor):
    sin, cos = ctx.saved_tensors
    return rotary_heads_backward_op(grad, sin, cos), None, None, None, None


rotary_heads_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


@torch.library.custom_op("sdt::depthwise_conv", mutates_args=())
def depthwise_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    """Depthwise k x k conv (stride 1, zero padding k // 2) of channels-last x, plus bias and residual.

    x: (B, H, W, C) with a unit channel stride; weight (C, 1, k, k), k odd; bias (C,); residual: None
    or (B, H, W, C) in x's dtype. Returns (B, H, W, C) contiguous in x's dtype. The forward and the
    input gradient are oneDNN convolutions on the channels-last NCHW view; the weight and bias
    gradients come from the C++ kernel (CPU only), where oneDNN's own backward was slow.
    """
    if x.device.type != "cpu":
        raise RuntimeError(f"sdt::depthwise_conv runs on the CPU, not {x.device.type}")
    out = F.conv2d(x.permute(0, 3, 1, 2), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=weight.shape[-1] // 2, groups=weight.shape[0]).permute(0, 2, 3, 1).contiguous()
    return out if residual is None else out.add_(residual)


@register_flop_formula(torch.ops.sdt.depthwise_conv)
def _depthwise_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode (``sdt.models.complexity``) sees the op, not the convolution inside it: count that."""
    batch, height, width, channels = x_shape
    return conv_flop_count([batch, channels, height, width], w_shape, [batch, channels, height, width], False)


@depthwise_conv_op.register_fake
def _(x, weight, bias, residual):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sdt::depthwise_conv_backward", mutates_args=())
def depthwise_conv_backward_op(grad: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``depthwise_conv_op`` for x (B, H, W, C), weight (C, 1, k, k) and bias (C,), in their dtypes."""
    grad = grad.to(x.dtype).contiguous()
    kernel = weight.shape[-1]
    # the input gradient is the convolution of grad with the kernel turned by 180 degrees
    grad_x = F.conv2d(grad.permute(0, 3, 1, 2), weight.to(x.dtype).flip(2, 3), padding=kernel // 2,
                      groups=weight.shape[0]).permute(0, 2, 3, 1).contiguous()
    grad_taps, grad_bias = _cpu_ops().dwconv_param_grads(grad, x, kernel)
    return grad_x, grad_taps.t().contiguous().view(weight.shape).to(weight.dtype), grad_bias.to(weight.dtype)


@depthwise_conv_backward_op.register_fake
def _(grad, x, weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _depthwise_setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _depthwise_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = depthwise_conv_backward_op(grad, x, weight)
    return (grad_x, grad_weight, grad_bias if ctx.has_bias else None,
            grad if ctx.has_residual and ctx.needs_input_grad[3] else None)


depthwise_conv_op.register_autograd(_depthwise_backward, setup_context=_depthwise_setup_context)
