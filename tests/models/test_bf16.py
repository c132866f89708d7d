"""bfloat16 on the CPU: the fused kernel's bf16 path, and bf16 autocast inference and training.

The C++ ops ``torch.ops.sdt_fused.forward/backward`` are called directly on flat (S, L, d) inputs:
bf16 q, k, v (and grad_out, out) with float32 rates and lse. Expected behaviour (fused_cpu.cpp):
the forward is the float32 kernel on the widened inputs (logits, bias, softmax and P v in float32,
so its log-sum-exp is float32's exactly), with the output rounded to bf16 once; the backward is
the float32 backward of the widened inputs, rounded once.

Tolerances: 2e-2 relative to the largest reference value against the float32 reference on float32
copies of the bf16 inputs (the rounding of the results and of the inputs' gradients, a few bf16 ulps).
"""
import contextlib
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import sdt  # noqa: F401  registers the models
from sdt.backends import fused_cpu
from sdt.backends import ops as ops_module
from sdt.backends.reference import reference_attention

BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def ops():
    """The kernel must really be built: a silent fallback would test nothing here."""
    built = fused_cpu.load()
    assert built is not None, f"fused CPU kernel did not build: {fused_cpu._failed}"
    return built


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def flat_inputs(batch, heads, grid, dim, rates_kind="per-token", sign="negative", seed=0):
    """bf16 q, k, v (S, L, d) with S = batch * heads and float32 rates (S, L)."""
    generator = torch.Generator().manual_seed(seed)
    sequences, tokens = batch * heads, grid[0] * grid[1]
    q, k, v = (torch.randn(sequences, tokens, dim, generator=generator).mul(2).bfloat16() for _ in range(3))
    shape = (sequences, tokens) if rates_kind == "per-token" else (sequences, 1)
    rates = torch.rand(*shape, generator=generator) * 0.6 + 0.05
    if sign == "negative":
        rates = -rates
    else:  # mixed signs with an exact zero: abs() and sign(0) = 0 of the bias matter
        rates = rates * torch.randn(*shape, generator=generator).sign()
        rates.view(-1)[0] = 0.0
    return q, k, v, rates.expand(sequences, tokens).contiguous()


def reference(q, k, v, rates, grid, indicator, grad_out):
    """The float32 reference on float32 copies of the inputs: out and the grads of q, k, v, rates, all (S, ...)."""
    leaves = [t.float().unsqueeze(0).requires_grad_() for t in (q, k, v, rates)]
    out = reference_attention(*leaves, grid, "full", "indicator" if indicator else "manhattan")
    out.backward(grad_out.float().unsqueeze(0))
    return out.detach()[0], [t.grad[0] for t in leaves]


GRIDS = [(5, 7), (1, 13), (9, 1), (14, 14)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("rates_kind", ["per-token", "per-head"])
@pytest.mark.parametrize("sign", ["negative", "mixed"])
@pytest.mark.parametrize("indicator", [False, True])
@pytest.mark.parametrize("budget", [1 << 17, 64])
def test_bf16_op_matches_float32_reference(ops, grid, rates_kind, sign, indicator, budget):
    q, k, v, rates = flat_inputs(2, 3, grid, 16, rates_kind, sign)
    out, lse = ops.forward(q, k, v, rates, grid[0], grid[1], indicator, budget)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and out.shape == q.shape
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    grads = ops.backward(grad_out, q, k, v, out, rates, lse, grid[0], grid[1], indicator, budget)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
    ref_out, ref_grads = reference(q, k, v, rates, grid, indicator, grad_out)
    assert relative_error(out, ref_out) < BF16_TOL
    for name, grad, ref in zip(("q", "k", "v", "rates"), grads, ref_grads):
        assert grad.shape == ref.shape, name
        assert relative_error(grad, ref) < BF16_TOL, f"d{name}: {relative_error(grad, ref):.2e}"


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("budget", [1 << 17, 64])
def test_bf16_is_the_float32_kernel_rounded_once(ops, grid, budget):
    """The bf16 path widens in cache: the forward's log-sum-exp and output are the float32 kernel's on the
    widened inputs (the output rounded to bf16 once, P never rounded), and the gradients are the float32
    backward's rounded to bf16."""
    q, k, v, rates = flat_inputs(2, 2, grid, 8, sign="mixed", seed=3)
    out, lse = ops.forward(q, k, v, rates, grid[0], grid[1], False, budget)
    wide = [t.float() for t in (q, k, v)]
    out32, lse32 = ops.forward(*wide, rates, grid[0], grid[1], False, budget)
    assert torch.equal(lse, lse32)
    assert torch.equal(out, out32.bfloat16())
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    grads = ops.backward(grad_out, q, k, v, out, rates, lse, grid[0], grid[1], False, budget)
    grads32 = ops.backward(grad_out.float(), *wide, out.float(), rates, lse, grid[0], grid[1], False, budget)
    for grad, grad32 in zip(grads[:3], grads32[:3]):
        assert torch.equal(grad, grad32.bfloat16())
    assert torch.equal(grads[3], grads32[3])


def test_float32_op_is_exact(ops):
    """The float32 path against the reference computed in float64."""
    grid = (6, 5)
    q, k, v, rates = (t.float() for t in flat_inputs(2, 2, grid, 8, sign="mixed"))
    for budget in (1 << 17, 64):
        out, _ = ops.forward(q, k, v, rates, grid[0], grid[1], False, budget)
        expected = reference_attention(*(t.double().unsqueeze(0) for t in (q, k, v, rates)), grid, "full", "manhattan")
        assert relative_error(out, expected[0]) < 1e-6


def test_long_distances_in_bf16(ops):
    """A 48x48 grid: distances up to 94, logits far below the row maximum, several row blocks per sequence."""
    grid = (48, 48)
    q, k, v, rates = flat_inputs(1, 2, grid, 16)
    out, _ = ops.forward(q, k, v, rates, grid[0], grid[1], False, 1 << 17)
    expected = reference_attention(*(t.float().unsqueeze(0) for t in (q, k, v, rates)), grid, "full", "manhattan")
    assert relative_error(out, expected[0]) < BF16_TOL


def test_bad_dtypes_are_named(ops):
    q, k, v, rates = flat_inputs(1, 1, (2, 3), 4)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.forward(q, k.float(), v, rates, 2, 3, False, 1 << 17)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.forward(q.half(), k.half(), v.half(), rates, 2, 3, False, 1 << 17)
    with pytest.raises(RuntimeError, match="rates must be"):
        ops.forward(q, k, v, rates.bfloat16(), 2, 3, False, 1 << 17)
    out, lse = ops.forward(q, k, v, rates, 2, 3, False, 1 << 17)
    with pytest.raises(RuntimeError, match="grad_out and out"):
        ops.backward(out.float(), q, k, v, out, rates, lse, 2, 3, False, 1 << 17)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_bf16_op_with_two_threads_under_no_grad_and_inference_mode(ops, mode):
    """Tiny tasks (budget 64) so that both threads run; results equal the one-thread ones bit for bit."""
    grid = (6, 5)
    q, k, v, rates = flat_inputs(2, 2, grid, 8)
    out1, lse1 = ops.forward(q, k, v, rates, grid[0], grid[1], False, 64)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    grads1 = ops.backward(grad_out, q, k, v, out1, rates, lse1, grid[0], grid[1], False, 64)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with threads(2), context():
        args = [t.clone() for t in (q, k, v, rates)]  # inference tensors under inference_mode
        out2, lse2 = ops.forward(*args, grid[0], grid[1], False, 64)
        grads2 = ops.backward(grad_out.clone(), *args[:3], out2, args[3], lse2, grid[0], grid[1], False, 64)
    assert torch.equal(out2, out1) and torch.equal(lse2, lse1)
    for grad2, grad1 in zip(grads2, grads1):
        assert torch.equal(grad2, grad1)


def _randomise_gates(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." in f".{name}":
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)


def _nano_for_training() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano", num_classes=10, in_chans=1, stem_stride=2, drop_path_rate=0.0)
    _randomise_gates(model)
    return model.train()


def test_bf16_autocast_training_step_of_sdt_h_nano(ops):
    """forward + backward under torch.autocast('cpu', bfloat16): finite gradients for every parameter,
    close to the float32 step's (same weights, same batch)."""
    model = _nano_for_training()
    x = torch.randn(4, 1, 28, 28)
    target = torch.tensor([0, 3, 5, 9])
    grads = {}
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["bf16"].keys() == grads["fp32"].keys()
    assert len(grads["bf16"]) == len([p for p in model.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads["bf16"].values())
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])
    # the rate path (gate W_g, bias, alpha) gets a gradient in bf16 too, in the float32 step's direction
    for n, g in grads["bf16"].items():
        if ".gate." in n:
            ref = grads["fp32"][n]
            cosine = F.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0).item()
            assert cosine > 0.9, f"{n}: cosine {cosine:.3f}"


def test_bf16_autocast_runs_the_fused_kernel_in_bf16_and_an_optimizer_step_moves_the_gates(ops, monkeypatch):
    """Under autocast the custom op hands the C++ kernel bf16 q, k, v (no float32 round trip) in the forward
    and the backward; one AdamW step gives a finite loss and changes every gate parameter (the rates'
    gradient reaches W_g, b and alpha through the kernel's float32 d(rates))."""
    calls = []

    class Recording:
        def forward(self, q, *args):
            calls.append(("forward", q.dtype))
            return ops.forward(q, *args)

        def backward(self, grad_out, q, *args):
            calls.append(("backward", q.dtype))
            return ops.backward(grad_out, q, *args)

        def __getattr__(self, name):  # the kernel's other ops (rotary, depthwise conv gradients) as they are
            return getattr(ops, name)

    monkeypatch.setattr(ops_module, "_cpu_ops", Recording)
    model = _nano_for_training()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n}
    assert gates
    with torch.autocast("cpu", torch.bfloat16):
        loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)).float(), torch.tensor([0, 3, 5, 9]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert {kind for kind, _ in calls} == {"forward", "backward"}
    assert all(dtype == torch.bfloat16 for _, dtype in calls), calls
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n in gates:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
            assert not torch.equal(p.detach(), gates[n]), f"{n} did not move"


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Fashion-MNIST is not installed here")
def test_shipped_nano_weights_agree_between_float32_and_bf16_autocast():
    """Top-1 of the shipped Fashion-MNIST classifier under bf16 autocast against float32, on 512 test images
    (benchmarks/bench_bf16.py checks all 10k)."""
    from sdt.data import fashion_mnist_tensors
    from sdt.tools.fid import in_domain_extractor

    classifier = in_domain_extractor()
    images, _ = fashion_mnist_tensors("test")
    images = images[:512]
    with torch.inference_mode():
        top1 = classifier.logits(images).argmax(-1)
        with torch.autocast("cpu", torch.bfloat16):
            top1_bf16 = classifier.logits(images).argmax(-1)
    assert (top1 == top1_bf16).float().mean().item() >= 0.99
