"""The fusions of the fast path (issue 30) against the plain torch code they replace.

- ``sdt::rotary_heads``: rotary embedding of q and k and their (B, n, L, d) layout in one pass
  (C++ on CPU; the Triton twin is tested in test_triton.py), forward and gradient, against
  ``apply_rotary`` on the head views, float32 and bfloat16, on a strided slice as the model feeds it.
- ``SpatialDecayAttention``'s one GEMM for q, k, v and the gate's logits, and the rotary kernel: the
  module on a kernel backend against the reference backend (which keeps the plain rotary), outputs
  and the gradients of every parameter (the gate's weight included).
- the in-place residual additions of ``SpatialDecayBlock``: grad mode, ``no_grad`` and
  ``inference_mode`` give the same output and leave the block's input untouched.
- ``linear_act``: oneDNN's linear with the bias and GELU fused, in float32 inference, against
  ``F.linear`` (+ GELU); the autograd path where a gradient is needed; its FLOP count.
"""
import pytest
import timm
import torch

import sdt  # noqa: F401  registers the models
from conftest import RecordOps
from sdt.attention import SpatialDecayAttention, apply_rotary, reference_backend, rotary_tables
from sdt.layers import _ONEDNN_LINEAR, depthwise_residual, linear_act
from sdt.backends import fused_cpu
from sdt.backends.ops import depthwise_conv_op, rotary_heads_op

fused_needed = pytest.mark.skipif(fused_cpu.load() is None, reason="the fused kernel did not build here")


def _strided_qk(batch=2, grid=(3, 5), heads=3, dim=8, dtype=torch.float32, seed=0):
    """q and k side by side in a wider (B, L, 3C + 5) tensor, as the fused projection leaves them."""
    generator = torch.Generator().manual_seed(seed)
    channels = heads * dim
    wide = torch.randn(batch, grid[0] * grid[1], 3 * channels + 5, generator=generator).to(dtype)
    return wide[..., :2 * channels]


def _plain_rotary(qk, sin, cos, heads):
    batch, tokens, channels = qk.shape
    dim = channels // (2 * heads)
    heads_view = qk.view(batch, tokens, 2, heads, dim).permute(2, 0, 3, 1, 4)  # (2, B, n, L, d)
    return torch.stack([apply_rotary(heads_view[0], sin, cos), apply_rotary(heads_view[1], sin, cos)])


@fused_needed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_heads_matches_apply_rotary(dtype):
    grid, heads, dim = (3, 5), 3, 8
    qk = _strided_qk(grid=grid, heads=heads, dim=dim, dtype=dtype)
    assert not qk.is_contiguous()
    sin, cos = rotary_tables(grid, dim)
    out = rotary_heads_op(qk, sin, cos, 2, heads)
    assert out.shape == (2, 2, heads, 15, dim) and out.dtype == dtype and out.is_contiguous()
    # the kernel rounds once from float32, apply_rotary rounds each product in bf16: compare with float32
    expected = _plain_rotary(qk.float(), sin, cos, heads)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@fused_needed
def test_rotary_heads_gradient_matches_autograd():
    grid, heads, dim = (4, 3), 2, 6
    sin, cos = rotary_tables(grid, dim)
    leaf = _strided_qk(grid=grid, heads=heads, dim=dim).detach().requires_grad_()
    plain = leaf.detach().clone().requires_grad_()
    weight = torch.randn(2, 2, heads, 12, dim)
    (rotary_heads_op(leaf, sin, cos, 2, heads) * weight).sum().backward()
    (_plain_rotary(plain, sin, cos, heads) * weight).sum().backward()
    torch.testing.assert_close(leaf.grad, plain.grad, atol=1e-6, rtol=1e-6)


@fused_needed
def test_rotary_heads_rejects_tables_of_another_grid():
    qk = _strided_qk(grid=(3, 5))
    sin, cos = rotary_tables((4, 5), 8)
    with pytest.raises(RuntimeError, match="rotary tables"):
        rotary_heads_op(qk, sin, cos, 2, 3)


def _random_gate(module: torch.nn.Module) -> None:
    """A trained-looking gate (W_g = 0 at init would hide errors in the gate's part of the GEMM)."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, SpatialDecayAttention) and m.gate.weight is not None:
            with torch.no_grad():
                m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=generator) * 0.1)


def _outputs_and_grads(module, x, reference: bool):
    module.zero_grad(set_to_none=True)
    if reference:
        with reference_backend(module):
            out = module(x)
    else:
        out = module(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@fused_needed
@pytest.mark.parametrize("decay", ["cag", "fixed", "content", "none"])
@pytest.mark.parametrize("layout", ["full", "decomposed"])
@pytest.mark.parametrize("lce", [5, 0])
def test_attention_fast_path_matches_reference(decay, layout, lce):
    torch.manual_seed(0)
    attn = SpatialDecayAttention(24, 3, decay=decay, layout=layout, backend="auto", lce_kernel_size=lce)
    _random_gate(attn)
    x = torch.randn(2, 4, 5, 24)
    out, grads = _outputs_and_grads(attn, x, reference=False)
    ref_out, ref_grads = _outputs_and_grads(attn, x, reference=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert ((grads[name] - ref_grads[name]).abs().max() / scale).item() < 1e-4, name


@fused_needed
def test_gate_logits_in_the_fused_gemm_match_the_float32_gate():
    """Outside autocast the gate's logits come from the shared GEMM; its rates equal the gate's own."""
    torch.manual_seed(0)
    attn = SpatialDecayAttention(16, 2, decay="cag")
    _random_gate(attn)
    x = torch.randn(2, 3, 4, 16)
    _, _, _, logits = attn._fused_qkv(x, None)
    assert logits is not None and logits.shape == (2, 3, 4, 2)
    torch.testing.assert_close(attn.gate(x, logits), attn.gate(x), atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):
        assert attn._fused_qkv(x, None)[3] is None  # under autocast the gate keeps its float32 GEMM


@fused_needed
def test_model_fast_path_matches_reference_in_bf16_autocast():
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano").eval()
    _random_gate(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = model(x).float()
        with reference_backend(model):
            ref = model(x).float()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 3e-2


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_block_residuals_in_place_leave_the_input_alone(mode):
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano", drop_path_rate=0.0).eval()
    block = model.stages[1].blocks[0]
    x = torch.randn(2, 8, 8, block.norm1.normalized_shape[0])
    kept = x.clone()
    rotary = rotary_tables((8, 8), block.attn.head_dim)
    with torch.no_grad():
        expected = x + block.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = expected + block.attn(block.norm1(expected), rotary)
        expected = expected + block.mlp(block.norm2(expected))
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        out = block(x, rotary)
    assert torch.equal(x, kept)
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)


def _depthwise_case(channels=6, kernel=5, dtype=torch.float32, strided=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(channels, generator=generator))
    wide = torch.randn(2, 5, 7, channels + (3 if strided else 0), generator=generator).to(dtype)
    x = wide[..., :channels]
    residual = torch.randn(2, 5, 7, channels, generator=generator).to(dtype)
    return conv, x, residual


@fused_needed
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_depthwise_kernel_matches_conv2d(kernel, strided):
    """``sdt::depthwise_conv`` (conv + bias + residual, channels last) and its gradients against nn.Conv2d."""
    conv, x, residual = _depthwise_case(kernel=kernel, strided=strided)
    leaves = [x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()]
    plain = [t.detach().clone().requires_grad_() for t in (x, residual)]
    weight = torch.randn(2, 5, 7, 6)
    out = depthwise_conv_op(leaves[0], conv.weight, conv.bias, leaves[1])
    (out * weight).sum().backward()
    grads = [conv.weight.grad.clone(), conv.bias.grad.clone()]
    conv.zero_grad()
    expected = plain[1] + conv(plain[0].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    (expected * weight).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaves[0].grad, plain[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaves[1].grad, plain[1].grad)
    torch.testing.assert_close(grads[0], conv.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[1], conv.bias.grad, atol=1e-4, rtol=1e-5)


@fused_needed
def test_depthwise_kernel_in_bf16():
    conv, x, residual = _depthwise_case(dtype=torch.bfloat16)
    out = depthwise_residual(conv, x, residual)
    assert out.dtype == torch.bfloat16
    expected = residual.float() + conv(x.float().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out.float(), expected.detach(), atol=0.1, rtol=2e-2)


@fused_needed
def test_depthwise_residual_takes_the_plain_path_where_the_kernel_does_not_apply():
    conv, x, residual = _depthwise_case()
    strided = torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)  # not stride 1: nn.Conv2d
    x_small = torch.randn(2, 6, 8, 6)
    expected = strided(x_small.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(depthwise_residual(strided, x_small, expected.new_zeros(expected.shape)), expected)
    with torch.autocast("cpu", torch.bfloat16):  # float32 x under autocast: the plain path's bf16 conv
        out = depthwise_residual(conv, x, residual)
    assert out.dtype == torch.float32


@fused_needed
def test_flop_counter_counts_the_depthwise_kernel_as_its_convolution():
    """sdt.models.complexity counts FLOPs with FlopCounterMode, which sees the custom op and not the conv inside it."""
    from torch.utils.flop_counter import FlopCounterMode

    conv, x, residual = _depthwise_case()
    counts = []
    for fn in (lambda: depthwise_conv_op(x, conv.weight, conv.bias, residual),
               lambda: conv(x.permute(0, 3, 1, 2))):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


onednn_needed = pytest.mark.skipif(not _ONEDNN_LINEAR, reason="this torch has no oneDNN linear")


@onednn_needed
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_linear_act_in_inference_is_the_fused_onednn_gemm(activation, strided, mode):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, 24, generator=generator)
    x = x.transpose(1, 2) if strided else x  # the attention's output reaches proj as such a view
    linear = torch.nn.Linear(24, 40)
    expected = linear(x)
    expected = torch.nn.functional.gelu(expected) if activation == "gelu" else expected
    with getattr(torch, mode)(), RecordOps() as log:
        out = linear_act(x, linear.weight, linear.bias, activation)
    assert "mkldnn._linear_pointwise" in log.names and "aten.addmm" not in log.names
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


@onednn_needed
def test_linear_act_takes_the_autograd_path_where_a_gradient_is_needed_or_autocast_casts():
    x = torch.randn(3, 16, requires_grad=True)
    linear = torch.nn.Linear(16, 8)
    with RecordOps() as log:
        out = linear_act(x, linear.weight, linear.bias, "gelu")
    assert "mkldnn._linear_pointwise" not in log.names
    out.sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    torch.nn.functional.gelu(torch.nn.functional.linear(expected_x, linear.weight, linear.bias)).sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert linear_act(x, linear.weight, linear.bias).dtype == torch.bfloat16  # autocast's bf16 GEMM
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        linear_act(x, linear.weight, linear.bias, "relu")


@onednn_needed
def test_flop_counter_counts_the_onednn_linear_as_its_gemm():
    from torch.utils.flop_counter import FlopCounterMode

    x, linear = torch.randn(2, 3, 5, 16), torch.nn.Linear(16, 8)
    counts = []
    for grad in (False, True):
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(grad):
            linear_act(x, linear.weight, linear.bias, "gelu")
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 30 * 16 * 8


@onednn_needed
@fused_needed
def test_model_inference_with_fused_linears_matches_grad_mode():
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)  # parameters need gradients: the plain F.linear path
    with torch.inference_mode(), RecordOps() as log:
        out = model(x)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert log.names.count("mkldnn._linear_pointwise") >= linears // 2  # q/k/v/gate share one
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


def test_stem_runs_its_convolutions_on_channels_last_memory_and_returns_contiguous_nhwc():
    """The stem's convolutions see channels-last inputs (oneDNN then skips its reorders around each one); the
    values are the NCHW stem's and the output is contiguous (B, H, W, C) without a final copy."""
    torch.manual_seed(0)
    stem = timm.create_model("sdt_h_nano").stem.eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
             for m in stem.conv if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = stem(x)
    for h in hooks:
        h.remove()
    assert seen == [True] * 4
    assert out.shape == (2, 16, 16, 32) and out.is_contiguous()
    with torch.no_grad():
        expected = stem.conv(x).permute(0, 2, 3, 1)  # NCHW memory, the plain module
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
