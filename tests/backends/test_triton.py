"""The Triton kernels (sdt.backends.triton) against the reference: outputs and gradients of q, k, v, rates,
through the entry the models use, the custom op ``torch.ops.sdt.spatial_decay_attention`` (``op_attention``
below), and the (S, L, d) kernels themselves.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the custom op sends CPU tensors to
them while ``sdt.backends.triton`` interprets). The interpreter needs
TRITON_INTERPRET=1 before ``triton`` itself is imported (triton.language's own jit functions,
tl.sum, tl.zeros, ..., are decorated for the interpreter or the GPU at import), and torch._dynamo
imports triton, so ``import sdt`` does too. Hence two ways these tests run on a CPU:

- this file alone (``pytest tests/backends/test_triton.py``), when it is the first to import triton: the
  variable is set below and the kernel tests run in this process;
- in the whole suite, where test_backends.py imported sdt first: the kernel tests are skipped here
  and ``test_kernels_in_an_interpreter_subprocess`` runs this file again in a fresh process with
  TRITON_INTERPRET=1 (and fails if any of them fails there).

With CUDA the kernel tests run on the GPU with the autotuned kernels, and the ``cuda`` tests add
bf16, TF32, larger shapes and every autotune config.

Tolerances: float32 with ``input_precision="ieee"`` 1e-4 relative to the largest reference value
(measured ~1e-6); TF32 dots 1e-2; bf16 inputs 2e-2 (P and dS are rounded to bf16 before their
products, as in FlashAttention, and the results are rounded to bf16).
"""
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")


def _triton_interprets() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


KERNELS_HERE = CUDA or _triton_interprets()

import sdt.backends.triton as sdt_triton  # noqa: E402  (after TRITON_INTERPRET)
from sdt.backends.reference import from_cols, reference_attention, rows_to_cols, to_cols, to_rows  # noqa: E402
from sdt.backends.ops import op_kernel  # noqa: E402
from sdt.backends.triton import triton_backward, triton_forward  # noqa: E402

kernels = pytest.mark.skipif(not KERNELS_HERE, reason="triton was imported before TRITON_INTERPRET could be set: "
                             "these run in test_kernels_in_an_interpreter_subprocess")
DEVICE = "cuda" if CUDA else "cpu"
F32_TOL = 1e-4
TF32_TOL = 1e-2
BF16_TOL = 2e-2
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
interpreter_only = pytest.mark.skipif(CUDA or not KERNELS_HERE, reason="checks the interpreter's fixed blocks")

RATE_SHAPES = {  # (B', n, L') given B, n, L
    "per-token": lambda b, n, l: (b, n, l),
    "per-token shared": lambda b, n, l: (1, n, l),
    "per-head": lambda b, n, l: (1, n, 1),
    "per-head per-image": lambda b, n, l: (b, n, 1),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """Largest error relative to the largest expected value (or to ``floor`` if that is smaller)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(floor)).item()


def make_inputs(batch, heads, grid, dim, rate_shape, sign="negative", dtype=torch.float32, seed=0, strength=1.0):
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=generator).to(DEVICE, dtype) for _ in range(3))
    rates = (torch.rand(*rate_shape, generator=generator) * 0.6 + 0.05) * strength
    if sign == "negative":
        rates = -rates
    elif sign == "mixed":  # the abs() of the bias matters here; exact zeros hit sign(0) = 0
        rates = rates * torch.randn(*rate_shape, generator=generator).sign()
        rates.view(-1)[0] = 0.0
        rates.view(-1)[-1] = 0.0
    return q, k, v, rates.to(DEVICE)


def outputs_and_grads(fn, q, k, v, rates):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rates)]
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    (out * weight).sum().backward()
    return out, [t.grad for t in leaves]


def op_attention(q, k, v, rates, grid, distance="manhattan", precision="ieee"):
    """Full-layout attention (B, n, L, d) through the custom op, as the models call it; its float32 dots
    follow torch's matmul precision ("highest": exact "ieee" dots, else TF32)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
    try:
        return op_kernel(q, k, v, rates, grid, distance)
    finally:
        torch.set_float32_matmul_precision(saved)


def assert_matches_reference(q, k, v, rates, grid, distance="manhattan", tol=F32_TOL, precision="ieee", floor=1e-12):
    out, grads = outputs_and_grads(lambda *a: op_attention(*a, grid, distance, precision), q, k, v, rates)
    ref_out, ref_grads = outputs_and_grads(lambda *a: reference_attention(*a, grid, "full", distance), q, k, v, rates)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert relative_error(out, ref_out) < tol, f"out: {relative_error(out, ref_out):.2e}"
    for name, grad, ref in zip(("q", "k", "v", "rates"), grads, ref_grads):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, name
        assert relative_error(grad, ref, floor) < tol, f"d{name}: {relative_error(grad, ref, floor):.2e}"


@pytest.fixture(autouse=True)
def one_config_on_the_gpu(request, monkeypatch):
    """On a GPU the kernel tests outside the ``cuda`` ones use one config of the tables: autotuning
    each of their many small shapes would compile every config of every kernel (minutes), and
    test_cuda_every_autotune_config checks each config; the ``cuda`` tests autotune."""
    if CUDA and "cuda" not in request.node.name:
        monkeypatch.setattr(sdt_triton, "FIXED_CONFIG", (64, 32, 4, 2))


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernels_in_an_interpreter_subprocess():
    """This file's kernel tests in a fresh process with TRITON_INTERPRET=1 (see the module docstring)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    selection = "not cuda and not interpreter_subprocess and not hopper"  # those two run in this process
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             "-k", selection], env=env, capture_output=True, text=True, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@kernels
def test_kernels_are_interpreted_without_a_gpu():
    """Guards the set-up above: on CPU the kernels must be the interpreter's, not GPU JIT functions."""
    from triton.runtime.interpreter import InterpretedFunction

    assert sdt_triton.INTERPRET == (not CUDA)
    kernels = (sdt_triton._forward_kernel, sdt_triton._backward_key_kernel, sdt_triton._backward_query_kernel)
    assert all(isinstance(kernel, InterpretedFunction) for kernel in kernels) == (not CUDA)


@kernels
@pytest.mark.parametrize("rate_kind", list(RATE_SHAPES))
@pytest.mark.parametrize("distance", ["manhattan", "indicator"])
@pytest.mark.parametrize("sign", ["negative", "mixed"])
def test_matches_reference(rate_kind, distance, sign):
    grid = (5, 7)  # 35 tokens: a full and a partial block of 32 each way under the interpreter
    q, k, v, rates = make_inputs(2, 2, grid, 16, RATE_SHAPES[rate_kind](2, 2, 35), sign)
    assert_matches_reference(q, k, v, rates, grid, distance)


@kernels
@pytest.mark.parametrize("grid", [(7, 9), (1, 13), (11, 1), (1, 1), (11, 13)])
def test_odd_grids_batch_one(grid):
    """Rows and columns of a raster grid (r = i // W, c = i % W); 11 x 13 has 5 blocks, the last partial."""
    tokens = grid[0] * grid[1]
    q, k, v, rates = make_inputs(1, 2, grid, 8, (1, 2, tokens), "mixed", seed=tokens)
    # one token: dq, dk and d(rates) are exactly 0 and the kernel's are rounding noise (~1e-8), so
    # they are compared absolutely
    assert_matches_reference(q, k, v, rates, grid, floor=1.0 if tokens == 1 else 1e-12)


@kernels
@pytest.mark.parametrize("dim", [8, 16, 32, 64, 128])
def test_head_dims(dim):
    """d < 16 and d not a power of two are padded (tl.dot needs K >= 16); masks keep the padding out."""
    grid = (4, 5)
    q, k, v, rates = make_inputs(2, 1, grid, dim, (2, 1, 20), "mixed", seed=dim)
    assert_matches_reference(q, k, v, rates, grid)


@kernels
def test_head_dim_not_a_power_of_two():
    q, k, v, rates = make_inputs(1, 2, (3, 6), 24, (1, 2, 1), "negative")
    assert_matches_reference(q, k, v, rates, (3, 6), "indicator")


@kernels
def test_strong_decay_underflows_like_the_reference():
    """Rates of about -6 on a 9 x 11 grid: far keys get logits near -100 (exp underflows to 0)."""
    q, k, v, rates = make_inputs(1, 2, (9, 11), 16, (1, 2, 99), "negative", strength=10.0)
    assert_matches_reference(q, k, v, rates, (9, 11))


@interpreter_only
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 16), (16, 64)])
def test_block_shapes(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N, blocks larger than the sequence, and many partial blocks (63 tokens)."""
    monkeypatch.setattr(sdt_triton, "FIXED_CONFIG", (*blocks, 4, 1))
    q, k, v, rates = make_inputs(2, 1, (7, 9), 16, (2, 1, 63), "mixed", seed=sum(blocks))
    assert_matches_reference(q, k, v, rates, (7, 9))


@kernels
@pytest.mark.parametrize("rate_kind", ["per-token", "per-head"])
def test_decomposed_layout_as_batches_of_one_dimensional_sequences(rate_kind):
    """The decomposed layout's row and column passes: 1 x W and 1 x H grids, B * H and B * W sequences."""
    grid = (6, 5)
    q, k, v, rates = make_inputs(2, 2, grid, 16, RATE_SHAPES[rate_kind](2, 2, 30), "mixed")

    def decomposed(q, k, v, rates):
        if rates.shape[-1] == 1:
            row_rates = col_rates = rates
        else:
            row_rates = to_rows(rates.unsqueeze(-1), grid).squeeze(-1)
            col_rates = to_cols(rates.unsqueeze(-1), grid).squeeze(-1)
        rows = op_attention(to_rows(q, grid), to_rows(k, grid), to_rows(v, grid), row_rates, (1, grid[1]))
        cols = op_attention(to_cols(q, grid), to_cols(k, grid), rows_to_cols(rows, grid), col_rates, (1, grid[0]))
        return from_cols(cols, grid)

    out, grads = outputs_and_grads(decomposed, q, k, v, rates)
    ref_out, ref_grads = outputs_and_grads(lambda *a: reference_attention(*a, grid, "decomposed", "manhattan"),
                                           q, k, v, rates)
    assert relative_error(out, ref_out) < F32_TOL
    for name, grad, ref in zip("qkv", grads[:3], ref_grads[:3]):
        assert relative_error(grad, ref) < F32_TOL, name
    assert relative_error(grads[3], ref_grads[3]) < F32_TOL


@kernels
def test_forward_backward_contract_and_broadcast_rates():
    """(S, L, d) kernels: lse is the natural log-sum-exp of the biased logits, rates are read in place
    through stride-0 views or as (S0, S1, L), and d(rates) comes back per token."""
    batch, heads, grid, dim = 2, 3, (4, 6), 16
    q, k, v, rates = make_inputs(batch, heads, grid, dim, (1, heads, 1), "mixed")
    flat = [t.reshape(batch * heads, 24, dim) for t in (q, k, v)]
    per_token = rates.expand(batch, heads, 24).reshape(batch * heads, 24).contiguous()
    out, lse = triton_forward(*flat, per_token, *grid, False, "ieee")
    assert out.shape == (6, 24, 16) and lse.shape == (6, 24) and lse.dtype == torch.float32

    from sdt.decay import full_2d_bias
    logits = q @ k.transpose(-1, -2) * dim ** -0.5 + full_2d_bias(rates, *grid)
    assert relative_error(lse, torch.logsumexp(logits, -1).reshape(6, 24)) < F32_TOL
    assert relative_error(out, torch.softmax(logits, -1).matmul(v).reshape(6, 24, dim)) < F32_TOL

    views = [rates.expand(batch, heads, 24),  # (S0, S1, L) with strides (0, 1, 0)
             per_token[:, :1].expand(6, 24),  # (S, L) with stride 0 along L
             per_token[:, :1]]  # (S, 1): broadcast
    for view in views:
        out_view, lse_view = triton_forward(*flat, view, *grid, False, "ieee")
        assert torch.equal(out_view, out) and torch.equal(lse_view, lse)

    grad_out = torch.randn_like(out)
    grads = triton_backward(grad_out, *flat, out, per_token, lse, *grid, False, "ieee")
    leaves = [t.detach().clone().requires_grad_() for t in (*flat, per_token)]
    ref = reference_attention(*(t.unsqueeze(0) for t in leaves[:3]), leaves[3].unsqueeze(0), grid, "full", "manhattan")
    ref.backward(grad_out.unsqueeze(0))
    for name, grad, leaf in zip(("q", "k", "v", "rates"), grads, leaves):
        assert grad.shape == leaf.shape, name
        assert relative_error(grad, leaf.grad) < F32_TOL, name
    for view in views:
        assert torch.equal(triton_backward(grad_out, *flat, out, view, lse, *grid, False, "ieee")[3], grads[3])
    no_rates = triton_backward(grad_out, *flat, out, per_token, lse, *grid, False, "ieee", rates_grad=False)
    assert no_rates[3] is None
    for grad, expected in zip(no_rates[:3], grads[:3]):
        assert torch.equal(grad, expected)


@kernels
def test_no_rate_gradient_when_rates_are_fixed():
    q, k, v, rates = make_inputs(1, 2, (3, 5), 16, (1, 2, 1))
    q.requires_grad_()
    op_attention(q, k, v, rates, (3, 5)).sum().backward()
    assert q.grad is not None and rates.grad is None


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs(dtype):
    """bf16/fp16 in, same dtype out, float32 inside (the interpreter upcasts the dots, a GPU uses native ones)."""
    grid = (6, 7)
    q, k, v, rates = make_inputs(2, 2, grid, 32, (2, 2, 42), "mixed", dtype=dtype)
    assert_matches_reference(q, k, v, rates, grid, tol=BF16_TOL)


@kernels
def test_bad_inputs_get_clear_errors():
    q, k, v, rates = make_inputs(1, 2, (3, 4), 8, (1, 2, 12))
    q, k, v = (t.reshape(2, 12, 8) for t in (q, k, v))
    rates = rates.reshape(2, 12)
    with pytest.raises(ValueError, match="grid 3 x 5 does not hold"):
        triton_forward(q, k, v, rates, 3, 5, False)
    with pytest.raises(TypeError, match="one dtype"):
        triton_forward(q, k.double(), v, rates, 3, 4, False)
    with pytest.raises(TypeError, match="rates must be float32"):
        triton_forward(q, k, v, rates.double(), 3, 4, False)
    with pytest.raises(ValueError, match="input_precision='tf64'"):
        triton_forward(q, k, v, rates, 3, 4, False, "tf64")
    with pytest.raises(ValueError, match=r"rates of shape \(3, 12\) do not fit"):
        triton_forward(q, k, v, torch.zeros(3, 12, device=DEVICE), 3, 4, False)
    with pytest.raises(ValueError, match="head dim 256"):
        big = torch.zeros(1, 12, 256, device=DEVICE)
        triton_forward(big, big, big, rates[:1], 3, 4, False)


@kernels
def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(sdt_triton, "INTERPRET", False)  # as on a CPU-only machine without TRITON_INTERPRET
    x = torch.zeros(1, 4, 16)
    with pytest.raises(RuntimeError, match="need CUDA tensors and these are on cpu.*TRITON_INTERPRET=1"):
        triton_forward(x, x, x, torch.zeros(1, 4), 2, 2, False)


def test_launches_bind_to_the_kernel_signatures(monkeypatch):
    """Every launch passes exactly the kernel's arguments (the interpreter drops unknown keywords that a
    GPU launch rejects); the kernels are recorded here, not run, so this holds without a GPU too."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            self.signature = inspect.signature(fn.fn)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
                if isinstance(self.kernel, Autotuner):  # its configs supply the block sizes
                    assert "BLOCK_M" not in kwargs
                    kwargs.update(BLOCK_M=32, BLOCK_N=32)
                self.signature.bind(*args, **kwargs)  # raises on a missing or unknown argument
                launched.append(self.kernel)
            return launch

    names = ("_forward_kernel", "_delta_kernel", "_backward_key_kernel", "_backward_query_kernel")
    for name in names:
        monkeypatch.setattr(sdt_triton, name, Recorder(getattr(sdt_triton, name)))
    monkeypatch.setattr(sdt_triton, "INTERPRET", True)  # CPU tensors pass the device check
    q, k, v, rates = (t.cpu() for t in make_inputs(1, 2, (3, 4), 16, (1, 2, 12)))
    q, k, v = (t.reshape(2, 12, 16) for t in (q, k, v))
    rates = rates.reshape(2, 12)
    out, lse = triton_forward(q, k, v, rates, 3, 4, False)
    for rates_grad in (True, False):
        triton_backward(q, q, k, v, out, rates, lse, 3, 4, False, rates_grad=rates_grad)
    assert len(launched) == 7


HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one H100/H200 block may use


def compile_for_hopper() -> None:
    """Compile the GPU kernels for sm_90 ahead of time (no GPU needed; ptxas ships with triton): the
    largest config of each table for bf16 d 64, and float32 "ieee" d 16 with the indicator and no
    rate gradient. Catches what the interpreter cannot: typing, layouts and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not sdt_triton.INTERPRET
    kernels = [(sdt_triton._forward_kernel, sdt_triton.FORWARD_TABLE),
               (sdt_triton._backward_key_kernel, sdt_triton.KEY_PASS_TABLE),
               (sdt_triton._backward_query_kernel, sdt_triton.QUERY_PASS_TABLE)]
    for dtype, dim, precision, indicator, rates_grad in (("bf16", 64, "tf32", False, True),
                                                         ("fp32", 16, "ieee", True, False)):
        for kernel, table in kernels:
            fn = kernel.fn  # the JITFunction under the autotuner
            block_m, block_n, warps, stages = table[0]
            constants = dict(HEAD_DIM=dim, D_PAD=max(16, dim), INDICATOR=indicator, PRECISION=precision,
                             UPCAST=False, RATES_GRAD=rates_grad, BLOCK_M=block_m, BLOCK_N=block_n)
            constants = {name: value for name, value in constants.items() if name in fn.arg_names}
            signature = {}
            for name in fn.arg_names:
                if name in constants:
                    signature[name] = "constexpr"
                elif name[0].isupper():  # tensors: q, k, v and their gradients in the input dtype
                    signature[name] = "*fp32" if name in ("R", "Lse", "Delta", "DRateCols", "DRates") else "*" + dtype
                else:
                    signature[name] = "fp32" if name == "scale" else "i32"
            compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            assert 0 < compiled.metadata.shared <= HOPPER_SHARED_BYTES, (fn.__name__, compiled.metadata.shared)


def test_kernels_compile_for_hopper_without_a_gpu():
    if not sdt_triton.INTERPRET:
        compile_for_hopper()
        return
    # the interpreter's kernels cannot be compiled: a fresh process that imports triton first
    code = ("import sys, triton\nsys.path.insert(0, sys.argv[1])\nimport test_triton\n"
            "test_triton.compile_for_hopper()\nprint('compiled')")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# ---- on a GPU only ------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("precision, tol", [("ieee", F32_TOL), ("tf32", TF32_TOL)])
@pytest.mark.parametrize("dim", [16, 64])
def test_cuda_float32_matches_reference(precision, tol, dim):
    grid = (14, 14)
    q, k, v, rates = make_inputs(2, 4, grid, dim, (2, 4, 196), "mixed")
    assert_matches_reference(q, k, v, rates, grid, tol=tol, precision=precision)


@cuda_only
@pytest.mark.parametrize("shape", [(2, 4, (56, 56), 16), (4, 6, (16, 16), 64), (8, 4, (1, 56), 16)],
                         ids=["stage1", "dit", "decomposed-rows"])
@pytest.mark.parametrize("rate_kind", ["per-token", "per-head"])
def test_cuda_bfloat16_matches_reference(shape, rate_kind):
    batch, heads, grid, dim = shape
    tokens = grid[0] * grid[1]
    q, k, v, rates = make_inputs(batch, heads, grid, dim, RATE_SHAPES[rate_kind](batch, heads, tokens),
                                 dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, rates, grid, tol=BF16_TOL)


@cuda_only
@pytest.mark.parametrize("config", sorted(set(sdt_triton.FORWARD_TABLE + sdt_triton.KEY_PASS_TABLE
                                              + sdt_triton.QUERY_PASS_TABLE)), ids=str)
def test_cuda_every_autotune_config(monkeypatch, config):
    """The autotuner picks the fastest config without checking it: each table entry must be right.
    (An entry that does not fit in shared memory is skipped by the autotuner and fails here.)"""
    monkeypatch.setattr(sdt_triton, "FIXED_CONFIG", config)
    grid = (9, 23)  # 207 tokens: partial blocks for every block size
    q, k, v, rates = make_inputs(2, 2, grid, 64, (2, 2, 207), "mixed", dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, rates, grid, tol=BF16_TOL)


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_heads_matches_apply_rotary(dtype):
    """The Triton twin of the C++ ``sdt::rotary_heads``: q and k from a strided slice, rotated into (2, B, n, L, d),
    and its gradient (the transposed rotation) against autograd through ``apply_rotary``."""
    from sdt.attention import apply_rotary, rotary_tables

    batch, grid, heads, dim = 2, (3, 5), 3, 6  # 36 channels: a padded block of 64
    tokens, channels = grid[0] * grid[1], heads * dim
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(batch, tokens, 3 * channels + 5, generator=generator).to(DEVICE, dtype)
    qk = wide[..., :2 * channels].detach().requires_grad_()
    plain = qk.detach().float().clone().requires_grad_()
    sin, cos = (t.to(DEVICE) for t in rotary_tables(grid, dim))
    out = sdt_triton.triton_rotary_heads(qk, sin, cos, 2, heads)
    views = plain.view(batch, tokens, 2, heads, dim).permute(2, 0, 3, 1, 4)
    expected = torch.stack([apply_rotary(views[0], sin, cos), apply_rotary(views[1], sin, cos)])
    assert out.shape == expected.shape and out.dtype == dtype
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    assert relative_error(out, expected) < tol
    weight = torch.randn(expected.shape, generator=generator).to(DEVICE)
    (expected * weight).sum().backward()
    grad = sdt_triton.triton_rotary_heads_backward(weight.to(dtype), sin, cos)
    assert grad.shape == qk.shape and grad.dtype == dtype
    assert relative_error(grad, plain.grad) < tol
