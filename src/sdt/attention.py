"""Spatial-decay attention: RMT's MaSA and SDT's Context-Aware Gating in one module.

``SpatialDecayAttention`` maps a (B, H, W, C) feature map to (B, H, W, C). It owns the
projections, RMT's rotary embedding and LCE, and a ``DecayGate`` that turns the input into
decay rates; the attention itself is one call to ``sdt.backends.spatial_decay_attention``.

Decay variants (``decay=``), all ``bias = -|(s_i + s_j) / 2 * dist(i, j)|``. The names and their
properties come from the one table ``sdt.decay.DECAY_VARIANTS``; this copy for the reader is
checked against it by the tests:

| decay     | rate s (per head h)                          | dist        | parameters         |
|-----------|----------------------------------------------|-------------|--------------------|
| "none"    | no bias at all (rotary + LCE only)           | -           | none               |
| "fixed"   | lambda_h (RMT), the same for every token     | Manhattan   | none (a buffer)    |
| "learned" | alpha_h * logsigmoid(b_h), same every token  | Manhattan   | b, alpha           |
| "cag"     | alpha_h * logsigmoid(x_i W_g + b)_h  (SDT)   | Manhattan   | W_g, b, alpha      |
| "content" | alpha_h * logsigmoid(x_i W_g + b)_h          | [i != j]    | W_g, b, alpha      |

Initialisation (our choice; the paper is silent): W_g = 0, b_h = logit(gamma_h) so that
logsigmoid(b_h) = lambda_h, and alpha = 1. Every variant with a distance term therefore starts
exactly at RMT's decay and learns away from it. alpha is learned per head by default
(``alpha="learned"``): it lets a head rescale its whole decay without driving the gate into
logsigmoid's flat tail; ``alpha="fixed"`` keeps it at 1.
"""
import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import register_notrace_function, register_notrace_module

from .backends import LAYOUTS, _portable_trace, check_backend, spatial_decay_attention, triton_available
from .backends import fused_cpu
from .backends.ops import rotary_heads_op
from .decay import DECAY_VARIANTS, decay_rates, decay_variant, rate_logits
from .layers import add_into, depthwise_residual, linear_act

DECAYS = tuple(DECAY_VARIANTS)  # the names, in the table's order
ALPHAS = ("learned", "fixed")


def _rotary_tables(height: int, width: int, head_dim: int, device: Optional[torch.device]) -> Tuple[Tensor, Tensor]:
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()  # (d,) pairs share one frequency
    index = torch.arange(height * width, device=device, dtype=torch.float32)
    phase = index[:, None] * angle[None, :]
    return torch.sin(phase), torch.cos(phase)


@torch.library.custom_op("sdt::rotary_tables", mutates_args=())
def _rotary_tables_op(height: int, width: int, head_dim: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    return _rotary_tables(height, width, head_dim, device)


@_rotary_tables_op.register_fake
def _(height: int, width: int, head_dim: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    return (torch.empty(height * width, head_dim, device=device),
            torch.empty(height * width, head_dim, device=device))


def rotary_tables(grid: Tuple[int, int], head_dim: int, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """RMT's rotary tables for an H x W grid: position = raster index r * W + c.

    theta_k = 1 / 10000^(k / (d/2 - 1)) for k < d/2, each used for one interleaved pair of channels.

    Under ``torch.compile`` the custom op ``sdt::rotary_tables`` computes them: one opaque node whose
    (L, d) outputs are materialised once per call. As plain pointwise code, inductor fused the sin
    and cos into every rotation's kernel and recomputed them for each batch element and head:
    compiled ``sdt_h_tiny`` ran at 0.72x eager, 1.07x with the op (docs/benchmarks.md). Elsewhere
    (eager, TorchScript, the ONNX tracer, which knows no custom op) they are plain torch code.

    Returns:
        sin, cos: (L, d) float32.
    """
    if torch.compiler.is_compiling():
        return torch.ops.sdt.rotary_tables(grid[0], grid[1], head_dim,
                                           torch.device("cpu") if device is None else device)
    return _rotary_tables(grid[0], grid[1], head_dim, device)


def apply_rotary(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (GPT-J style): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    x: (..., L, d); sin, cos: (L, d), any float dtype. Returns x's shape and dtype.

    The tables are cast to x's dtype first: float32 tables (``rotary_tables``) would otherwise
    promote bf16/fp16 q and k to float32 for the whole product (autocast leaves elementwise ops alone).
    """
    sin = sin.to(x.dtype)
    cos = cos.to(x.dtype)
    x_even = x[..., ::2]
    x_odd = x[..., 1::2]
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    return x * cos + rotated * sin


@torch.jit.unused
def _gate_logits_eager(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    # meta tensors (shape-only FLOP counting) have no autocast state; CPU's is equivalent there
    with torch.autocast(device_type="cpu" if x.device.type == "meta" else x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), bias.float())


# Leaves for torch.fx, in timm's tracer (register_notrace_function) and in plain torch.fx.symbolic_trace
# (torch.fx.wrap): they branch on the device or on the grid size, so a traced graph calls them and they
# run eagerly on the actual input. spatial_decay_attention picks its backend per call the same way.
for _name in ("rotary_tables", "_gate_logits_eager", "spatial_decay_attention"):
    torch.fx.wrap(_name)
    register_notrace_function(globals()[_name])
for _name in ("add_into", "depthwise_residual", "linear_act"):  # sdt.layers registers them with timm's tracer
    torch.fx.wrap(_name)
del _name


class DecayGate(nn.Module):
    """Turns a (B, H, W, C) input into the decay rates the attention backends consume.

    Output: (B, n, L) float32 for token-dependent variants ("cag", "content"), (1, n, 1) for
    per-head variants ("fixed", "learned"), None for "none" (see ``sdt.decay.DECAY_VARIANTS``).
    Always computed in float32, also under autocast.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            decay: str = "cag",
            init_value: float = 2.0,
            heads_range: float = 4.0,
            alpha: str = "learned",
    ):
        super().__init__()
        variant = decay_variant(decay)
        if alpha not in ALPHAS:
            raise ValueError(f"unknown alpha {alpha!r}; choose one of {ALPHAS}")
        self.decay = variant.name
        self.num_heads = num_heads
        self.init_value = init_value
        self.heads_range = heads_range
        self.has_bias = variant.has_bias
        self.token_dependent = variant.token_dependent
        self.learnable = learnable = variant.learnable
        self.register_buffer("fixed_rates", decay_rates(num_heads, init_value, heads_range), persistent=False)
        self.weight = nn.Parameter(torch.zeros(num_heads, dim)) if self.token_dependent else None
        self.bias = nn.Parameter(torch.zeros(num_heads)) if learnable else None
        if learnable and alpha == "learned":
            self.alpha = nn.Parameter(torch.ones(num_heads))
        else:
            self.register_buffer("alpha", torch.ones(num_heads), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_g = 0, b = logit(gamma), alpha = 1: the gate starts exactly at RMT's decay."""
        if self.weight is not None:
            self.weight.zero_()
        if self.bias is not None:
            self.bias.copy_(rate_logits(decay_rates(self.num_heads, self.init_value, self.heads_range)))
        self.alpha.fill_(1.0)

    def gate_map(self, x: Tensor) -> Tensor:
        """G = logsigmoid(x W_g + b): (B, H, W, C) -> (B, n, L) float32 (the paper's decay intensity)."""
        weight = self.weight
        bias = self.bias
        assert weight is not None and bias is not None, "gate_map needs a token-dependent decay"
        if torch.jit.is_scripting():
            logits = F.linear(x.float(), weight.float(), bias.float())
        else:
            logits = _gate_logits_eager(x, weight, bias)
        return F.logsigmoid(logits).flatten(1, 2).transpose(1, 2)

    def forward(self, x: Tensor, logits: Optional[Tensor] = None) -> Optional[Tensor]:
        """x: (B, H, W, C); logits: x W_g + b, (B, H, W, n) float32, when the caller computed them already
        (``SpatialDecayAttention`` does, in its fused projection). -> rates (class docstring)."""
        if not self.has_bias:
            return None
        if not self.learnable:  # RMT's fixed per-head rates
            return self.fixed_rates.view(1, -1, 1)
        alpha = self.alpha.float().view(1, -1, 1)
        if self.token_dependent:
            if logits is None:
                rates = self.gate_map(x) * alpha
            else:
                rates = F.logsigmoid(logits).flatten(1, 2).transpose(1, 2) * alpha
        else:
            bias = self.bias
            assert bias is not None
            rates = F.logsigmoid(bias.float()).view(1, -1, 1) * alpha
        # Clamped so that any finite input gives a finite bias (|bias| <= 1e6 * max distance).
        return rates.clamp(-1e6, 1e6)

    def extra_repr(self) -> str:
        return f"decay={self.decay!r}, num_heads={self.num_heads}"


class GateDrift:
    """How far the learned decay rates of ``model`` have moved from RMT's fixed rates, measured on the
    forward passes run inside ``with GateDrift(model) as drift:``.

    For each learnable ``DecayGate`` (in module order) it sums |s - lambda_h| over images, heads and
    tokens, where s is the rate the gate hands to the attention (alpha_h G for "cag") and lambda_h
    RMT's rate: 0 at initialisation, so it shows whether the gates learn at all. ``sums`` is a
    (gates, 2) float64 tensor of [sum, count] on the gates' device, for a caller to all-reduce
    across processes before ``metrics()``. A model without learnable gates gives no metrics.
    """

    def __init__(self, model: nn.Module):
        self.gates: List[DecayGate] = [m for m in model.modules() if isinstance(m, DecayGate) and m.learnable]
        device = self.gates[0].fixed_rates.device if self.gates else None
        self.sums = torch.zeros(len(self.gates), 2, dtype=torch.float64, device=device)
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []

    def _record(self, index: int, gate: DecayGate, rates: Tensor) -> None:
        drift = (rates.detach().float() - gate.fixed_rates.view(1, -1, 1)).abs()  # (B, n, L) or (1, n, 1)
        self.sums[index, 0] += drift.sum().double()
        self.sums[index, 1] += drift.numel()

    def __enter__(self) -> "GateDrift":
        self._hooks = [gate.register_forward_hook(lambda m, inp, out, i=i: self._record(i, m, out))
                       for i, gate in enumerate(self.gates)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def metrics(self) -> Dict[str, float]:
        """``gate_drift``: the mean over gates; ``gate_drift.<i>``: gate i's mean |s - lambda_h|."""
        if not self.gates or not bool((self.sums[:, 1] > 0).all()):
            return {}
        per_gate = (self.sums[:, 0] / self.sums[:, 1]).tolist()
        return {"gate_drift": sum(per_gate) / len(per_gate), **{f"gate_drift.{i}": v for i, v in enumerate(per_gate)}}


@register_notrace_module  # shape-dependent dispatch: a leaf for torch.fx, as timm does for its attentions
class SpatialDecayAttention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with RMT/SDT spatial decay.

    q, k, v and output projections with bias, rotary embedding on q and k (raster positions),
    LCE (a depthwise 5x5 conv on v added to the attention output), and the decay bias.

    Args:
        dim: channels C (divisible by ``num_heads``, with an even head size).
        num_heads: heads n.
        decay: one of ``DECAYS`` (see the module docstring).
        layout: "full" (2D decay over all L tokens) or "decomposed" (rows, then columns).
        init_value, heads_range: RMT's per-head decay rates (also the gate's starting point).
        alpha: "learned" (per head, starts at 1) or "fixed" (1).
        backend: attention backend (see ``sdt.backends``), "auto" picks per call.
        lce_kernel_size: LCE's depthwise kernel; 0 turns LCE off (plain attention output).
        rotary: rotate q and k by RMT's rotary embedding; False for models that add absolute
            position embeddings instead (DiT).

    Eager mode and ``torch.compile`` run a fast path (issue 30, docs/benchmarks.md section 5): one GEMM
    for q, k, v (and the gate's logits in float32), the ``sdt::rotary_heads`` kernel for the rotary
    embedding and the heads' layout, and LCE with its residual in ``depthwise_residual``. TorchScript,
    torch.fx, ONNX export and the reference backend keep the plain ops, which compute the same values
    up to float rounding.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            decay: str = "cag",
            layout: str = "full",
            init_value: float = 2.0,
            heads_range: float = 4.0,
            alpha: str = "learned",
            backend: str = "auto",
            lce_kernel_size: int = 5,
            rotary: bool = True,
    ):
        super().__init__()
        if dim % num_heads != 0 or (dim // num_heads) % 2 != 0:
            raise ValueError(
                f"dim={dim} must split into num_heads={num_heads} heads of an even size (rotary pairs channels); "
                f"pick num_heads so that dim / num_heads is even")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.layout = layout
        self.distance = decay_variant(decay).distance or "manhattan"  # no bias for "none": unused
        self.backend = check_backend(backend)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.use_rotary = rotary
        self.lce = nn.Conv2d(dim, dim, lce_kernel_size, padding=lce_kernel_size // 2, groups=dim) if lce_kernel_size else None
        self.gate = DecayGate(dim, num_heads, decay, init_value, heads_range, alpha)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, n, L, d)"""
        return t.flatten(1, 2).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    @torch.jit.unused
    def _fused_qkv(self, x: Tensor, rotary: Optional[Tuple[Tensor, Tensor]], fuse_gate: bool = True
                   ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """q, k (B, n, L, d) with rotary, v (B, H, W, C) and, in float32 outside autocast, the gate's logits
        (B, H, W, n), from one GEMM.

        The weights are concatenated per call (the modules and the state-dict keys stay as they are).
        The gate's logits join the GEMM only where it runs in float32 anyway: under autocast the
        gate stays a float32 GEMM of its own (``DecayGate``). q and k are neighbours in the GEMM's
        output, so one ``sdt::rotary_heads`` pass rotates both and writes them in the layout the
        attention kernels read, where that kernel runs (``_rotary_kernel_applies``). ``fuse_gate=False``:
        the gate reads other tokens than x, so its logits stay out of the GEMM.
        """
        dim = self.q.out_features
        weights = [self.q.weight, self.k.weight, self.v.weight]
        biases = [self.q.bias, self.k.bias, self.v.bias]
        gate = self.gate
        with_gate = (fuse_gate and gate.weight is not None and gate.bias is not None and x.dtype == torch.float32
                     and x.device.type != "meta" and not torch.is_autocast_enabled(x.device.type))
        if with_gate:
            weights.append(gate.weight.float())
            biases.append(gate.bias.float())
        qkv = linear_act(x, torch.cat(weights), torch.cat(biases))
        # split and unbind, not slices and indexing: their backward is one concatenation, where each
        # slice's would fill a zero tensor of the whole output's size
        if with_gate:
            qk, v, logits = qkv.split([2 * dim, dim, qkv.shape[-1] - 3 * dim], dim=-1)
        else:
            qk, v = qkv.split([2 * dim, dim], dim=-1)
            logits = None
        if self.use_rotary and rotary is None:
            rotary = rotary_tables((x.shape[1], x.shape[2]), self.head_dim, x.device)
        if rotary is not None and self.use_rotary and self._rotary_kernel_applies(qk):
            q, k = rotary_heads_op(qk.flatten(1, 2), rotary[0], rotary[1], 2, self.num_heads).unbind(0)
            return q, k, v, logits
        q, k = (self._heads(t) for t in qk.split(dim, dim=-1))
        if rotary is not None and self.use_rotary:
            q, k = apply_rotary(q, rotary[0], rotary[1]), apply_rotary(k, rotary[0], rotary[1])
        return q, k, v, logits

    @torch.jit.unused
    def _rotary_kernel_applies(self, q: Tensor) -> bool:
        """Whether q and k get their rotary embedding from the ``sdt::rotary_heads`` kernel: eager or
        ``torch.compile`` on CPU (the fused C++ kernel built) or CUDA (Triton); the plain torch code under
        the reference backend (the ground truth) and the portable traces."""
        if self.backend == "reference" or _portable_trace():
            return False
        if q.device.type == "cpu":
            return q.dtype in (torch.float32, torch.bfloat16) and fused_cpu.available()
        return q.device.type == "cuda" and triton_available()

    def forward(self, x: Tensor, rotary: Optional[Tuple[Tensor, Tensor]] = None,
                gate_input: Optional[Tensor] = None) -> Tensor:
        """x: (B, H, W, C); rotary: (sin, cos) from ``rotary_tables`` (built here if None); gate_input: the
        (B, H, W, C) tokens the decay gate reads instead of x (DiT's ``gate_input="normalized"``). -> (B, H, W, C)"""
        height, width = x.shape[1], x.shape[2]
        gate_logits: Optional[Tensor] = None
        if torch.jit.is_scripting():
            plain = True
        else:
            plain = _portable_trace()  # traced graphs of plain torch ops, as the reference backend's
        if plain:
            q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self.v(x)
            if self.use_rotary:
                if rotary is None:
                    rotary = rotary_tables((height, width), self.head_dim, x.device)
                q, k = apply_rotary(q, rotary[0], rotary[1]), apply_rotary(k, rotary[0], rotary[1])
        else:
            q, k, v, gate_logits = self._fused_qkv(x, rotary, fuse_gate=gate_input is None)
        rates = self.gate(x if gate_input is None else gate_input, gate_logits)
        out = spatial_decay_attention(q, k, self._heads(v), rates, (height, width), self.layout, self.distance, self.backend)
        out = out.transpose(1, 2).flatten(2).unflatten(1, (height, width))
        if self.lce is not None:
            if torch.jit.is_scripting():
                out = add_into(self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), out)
            else:
                out = depthwise_residual(self.lce, v, out)
        if torch.jit.is_scripting():
            return self.proj(out)
        return linear_act(out, self.proj.weight, self.proj.bias)


@contextlib.contextmanager
def reference_backend(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run every spatial-decay attention of ``model`` on the reference backend."""
    modules = [m for m in model.modules() if isinstance(m, SpatialDecayAttention)]
    saved = [m.backend for m in modules]
    for m in modules:
        m.backend = "reference"
    try:
        yield model
    finally:
        for m, backend in zip(modules, saved):
            m.backend = backend
