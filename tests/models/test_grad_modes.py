"""Every attention kernel entry under grad mode, ``no_grad`` and ``inference_mode``, with 1 and 2 threads.

Grad mode and InferenceMode are thread-local: a kernel whose worker threads do not inherit the
caller's state writes into inference tensors "outside InferenceMode" and raises. The fused
kernel's tasks are made tiny here (``task_elements``) so that even small inputs split into many
tasks and both threads take part.
"""
import contextlib

import pytest
import timm
import torch

import sdt  # noqa: F401  registers the models
from sdt.backends import fused_cpu
from sdt.backends import spatial_decay_attention
from sdt.backends.reference import reference_attention

MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inputs(grid=(6, 5), batch=2, heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3))
    rates = -(torch.rand(batch, heads, tokens, generator=generator) * 0.5 + 0.05)
    return q, k, v, rates


fused_needed = pytest.mark.skipif(fused_cpu.load() is None, reason="the fused kernel did not build here")


@fused_needed
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["full", "decomposed"])
def test_fused_forward_in_every_mode(mode, num_threads, layout):
    grid = (6, 5)
    q, k, v, rates = inputs(grid)
    expected = reference_attention(q, k, v, rates, grid, layout, "manhattan")
    with threads(num_threads), MODES[mode]():
        q_, k_, v_, rates_ = (t.clone() for t in (q, k, v, rates))  # inference tensors under inference_mode
        out = spatial_decay_attention(q_, k_, v_, rates_, grid, layout, backend="fused")
        raw_out, raw_lse = fused_cpu.load().forward(
            q_.flatten(0, 1).contiguous(), k_.flatten(0, 1).contiguous(), v_.flatten(0, 1).contiguous(),
            rates_.flatten(0, 1).contiguous(), grid[0], grid[1], False, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if layout == "full":
        torch.testing.assert_close(raw_out.view_as(expected), expected, rtol=1e-5, atol=1e-5)
        assert raw_lse.shape == (4, 30)


@fused_needed
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_backward_op_in_every_mode(mode, num_threads):
    """The raw backward op, called directly, and through autograd (grad mode only)."""
    grid = (6, 5)
    q, k, v, rates = inputs(grid)
    ops = fused_cpu.load()
    flat = [t.flatten(0, 1).contiguous() for t in (q, k, v, rates)]
    out, lse = ops.forward(*flat, grid[0], grid[1], False, 64)
    grad_out = torch.randn_like(out)
    expected = ops.backward(grad_out, flat[0], flat[1], flat[2], out, flat[3], lse, grid[0], grid[1], False, 1 << 17)
    with threads(num_threads), MODES[mode]():
        args = [t.clone() for t in (grad_out, flat[0], flat[1], flat[2], out, flat[3], lse)]
        grads = ops.backward(*args, grid[0], grid[1], False, 64)
    for grad, ref in zip(grads, expected):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


@fused_needed
def test_switching_modes_and_threads_in_one_process(monkeypatch):
    grid = (6, 5)
    q, k, v, rates = inputs(grid)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rates)]
    expected = reference_attention(q, k, v, rates, grid, "full", "manhattan")
    monkeypatch.setattr(fused_cpu, "TASK_ELEMENTS", 64)  # many tasks even for this small input
    for num_threads in (2, 1, 2):
        for mode in ("inference_mode", "grad", "no_grad", "inference_mode", "grad"):
            with threads(num_threads), MODES[mode]():
                out = spatial_decay_attention(*leaves, grid, "full", backend="fused")
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
                if mode == "grad":
                    out.sum().backward()
                    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_other_backends_under_no_grad_and_inference_mode(backend, mode):
    grid = (6, 5)
    q, k, v, rates = inputs(grid)
    expected = reference_attention(q, k, v, rates, grid, "full", "manhattan")
    with threads(2), MODES[mode]():
        out = spatial_decay_attention(q.clone(), k.clone(), v.clone(), rates.clone(), grid, "full", backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sdt_h_nano", "sdt_h_tiny_full2d"])
def test_model_under_inference_mode_with_two_threads(name):
    """The issue's repro at a smaller size: 224 gives stage-1 grids big enough for many kernel tasks."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    with threads(2), torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
