"""Every attention backend against the reference: outputs and gradients of q, k, v and the rates.

Tolerances: float32 1e-4 relative to the largest reference value (the issue's bound; measured errors
are ~1e-6). bfloat16 inputs: 2e-2 relative (a few bf16 ulps: every backend computes in float32 and
rounds once at the end, gradients of the inputs are rounded to bf16 too).
"""
import os
import subprocess
import sys

import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st

import sdt  # noqa: F401  registers the models
from sdt.attention import DECAYS, SpatialDecayAttention
from sdt.backends import choose_backend, spatial_decay_attention
from sdt.backends import fused_cpu
from sdt.backends.chunked import CHUNK_ELEMENTS, chunk_rows, chunked_attention
from sdt.backends.flex import flex_decay_attention
from sdt.backends.reference import reference_attention

F32_TOL = 1e-4
BF16_TOL = 2e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def make_inputs(batch, heads, grid, dim, rate_shape, sign="negative", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=generator).to(dtype) for _ in range(3))
    rates = torch.rand(*rate_shape, generator=generator) * 0.6 + 0.05
    if sign == "negative":
        rates = -rates
    elif sign == "mixed":  # the abs() of the bias matters here; exact zeros hit sign(0)
        rates = rates * torch.randn(*rate_shape, generator=generator).sign()
        rates.view(-1)[0] = 0.0
    return q, k, v, rates


def outputs_and_grads(fn, q, k, v, rates, grid, layout, distance):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rates)]
    out = fn(*leaves, grid, layout, distance)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    (out * weight).sum().backward()
    return out, [t.grad for t in leaves]


def assert_matches_reference(fn, q, k, v, rates, grid, layout="full", distance="manhattan", tol=F32_TOL):
    out, grads = outputs_and_grads(fn, q, k, v, rates, grid, layout, distance)
    ref_out, ref_grads = outputs_and_grads(reference_attention, q, k, v, rates, grid, layout, distance)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert relative_error(out, ref_out) < tol
    for name, grad, ref in zip(("q", "k", "v", "rates"), grads, ref_grads):
        assert grad.shape == ref.shape, name
        assert relative_error(grad, ref) < tol, f"d{name}: {relative_error(grad, ref):.2e}"


def chunked(chunk):
    return lambda *args: chunked_attention(*args, chunk=chunk)


def using(backend):
    return lambda *args: spatial_decay_attention(*args, backend=backend)


RATE_SHAPES = {  # (B', n, L') given B, n, L
    "per-token": lambda b, n, l: (b, n, l),
    "per-token shared": lambda b, n, l: (1, n, l),
    "per-head": lambda b, n, l: (1, n, 1),
    "per-head per-image": lambda b, n, l: (b, n, 1),
}


@pytest.mark.parametrize("rate_kind", list(RATE_SHAPES))
@pytest.mark.parametrize("distance", ["manhattan", "indicator"])
@pytest.mark.parametrize("sign", ["negative", "mixed"])
@pytest.mark.parametrize("layout", ["full", "decomposed"])
def test_chunked_matches_reference(rate_kind, distance, sign, layout):
    grid = (5, 7)
    q, k, v, rates = make_inputs(2, 3, grid, 8, RATE_SHAPES[rate_kind](2, 3, 35), sign)
    # chunk 4: 9 chunks with a partial last one (full); 2 and 1 chunks per row / column (decomposed)
    assert_matches_reference(chunked(4), q, k, v, rates, grid, layout, distance)


@pytest.mark.parametrize("grid", [(7, 9), (1, 13), (11, 1), (1, 1), (3, 3)])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_chunked_odd_grids_batch_one(grid, chunk):
    tokens = grid[0] * grid[1]
    q, k, v, rates = make_inputs(1, 2, grid, 4, (1, 2, tokens), "mixed")
    assert_matches_reference(chunked(chunk), q, k, v, rates, grid)


@pytest.mark.parametrize("layout", ["full", "decomposed"])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_dispatch_forward_matches_reference(layout, backend):
    grid = (4, 6)
    q, k, v, rates = make_inputs(2, 2, grid, 8, (2, 2, 24))
    for r in (None, rates):
        if backend == "flex" and r is not None:
            continue  # compiles a kernel: see test_flex_compiled_forward_matches_reference (slow)
        with torch.no_grad():
            out = spatial_decay_attention(q, k, v, r, grid, layout, "manhattan", backend)
        assert relative_error(out, reference_attention(q, k, v, r, grid, layout, "manhattan")) < F32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_reduced_precision(dtype):
    grid = (6, 5)
    q, k, v, rates = make_inputs(2, 2, grid, 16, (2, 2, 30), dtype=dtype)
    assert_matches_reference(chunked(7), q, k, v, rates, grid, tol=BF16_TOL)
    # and against the float32 computation: the only loss is rounding the inputs and the result
    out = chunked_attention(q, k, v, rates, grid, "full", "manhattan")
    assert out.dtype == dtype
    out32 = reference_attention(q.float(), k.float(), v.float(), rates, grid, "full", "manhattan")
    assert relative_error(out, out32) < BF16_TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("distance", ["manhattan", "indicator"])
@pytest.mark.parametrize("rate_kind", ["per-token", "per-head"])
@pytest.mark.parametrize("layout", ["full", "decomposed"])
def test_flex_forward_matches_reference(distance, rate_kind, layout):
    """The score_mod itself, run by FlexAttention's eager path (the compiled kernel: the slow test below)."""
    grid = (7, 9)
    q, k, v, rates = make_inputs(2, 2, grid, 8, RATE_SHAPES[rate_kind](2, 2, 63))
    out = flex_decay_attention(q, k, v, rates, grid, layout, distance, compiled=False)
    assert relative_error(out, reference_attention(q, k, v, rates, grid, layout, distance)) < F32_TOL


@pytest.mark.slow
def test_flex_compiled_forward_matches_reference():
    grid = (7, 9)
    q, k, v, rates = make_inputs(1, 2, grid, 16, (1, 2, 63))
    with torch.no_grad():
        out = spatial_decay_attention(q, k, v, rates, grid, "full", "manhattan", "flex")
    assert relative_error(out, reference_attention(q, k, v, rates, grid, "full", "manhattan")) < F32_TOL


def test_flex_refuses_cpu_backward_with_a_clear_error():
    grid = (3, 4)
    q, k, v, rates = make_inputs(1, 2, grid, 8, (1, 2, 12))
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="no backward pass on CPU.*chunked"):
        spatial_decay_attention(q, k, v, rates, grid, "full", "manhattan", "flex")


def test_unknown_backend_is_rejected():
    q, k, v, rates = make_inputs(1, 1, (2, 2), 4, (1, 1, 4))
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*chunked"):
        spatial_decay_attention(q, k, v, rates, (2, 2), "full", "manhattan", "fast")


def test_auto_dispatch_table():
    stage1, stage3, stage4 = (torch.zeros(8, n, l, 16) for n, l in ((4, 3136), (8, 196), (16, 49)))
    grid1, grid3, grid4 = (56, 56), (14, 14), (7, 7)
    fixed = torch.zeros(1, 4, 1)
    cag = torch.zeros(8, 4, 3136)
    learned = torch.zeros(1, 4, 1, requires_grad=True)
    training = stage1.clone().requires_grad_()
    # CPU, per-token or trained rates: the fused kernel, any layout or size, training or not
    assert choose_backend(stage1, cag, grid1, "full") == "fused"
    assert choose_backend(stage1, cag, grid1, "decomposed") == "fused"
    assert choose_backend(training, cag, grid1, "full") == "fused"
    assert choose_backend(stage4, torch.zeros(8, 16, 49), grid4, "full") == "fused"
    assert choose_backend(stage1, learned, grid1, "decomposed") == "fused"  # learned rates in training
    assert choose_backend(torch.zeros(8, 4, 784, 32), learned, (28, 28), "full") == "fused"  # bias would need grad
    # untrained per-head rates on the CPU: fused, except tiny grids (up to 8x8 full, lines up to 4 long)
    with torch.no_grad():
        assert choose_backend(stage1, learned, grid1, "decomposed") == "fused"  # frozen: fixed rates
        assert choose_backend(torch.zeros(8, 4, 784, 32), learned, (28, 28), "full") == "fused"
    assert choose_backend(stage1, fixed, grid1, "full") == "fused"
    assert choose_backend(stage1, fixed, grid1, "decomposed") == "fused"
    assert choose_backend(stage3, torch.zeros(1, 8, 1), grid3, "full") == "fused"
    assert choose_backend(torch.zeros(128, 2, 196, 16), torch.zeros(1, 2, 1), (14, 14), "decomposed") == "fused"
    assert choose_backend(stage4, torch.zeros(1, 16, 1), grid4, "full") == "reference"  # 49 tokens
    assert choose_backend(stage4, torch.zeros(1, 16, 1), grid4, "decomposed") == "fused"
    nano3 = torch.zeros(128, 8, 16, 16)
    assert choose_backend(nano3, torch.zeros(1, 8, 1), (4, 4), "decomposed") == "reference"
    # fixed off the CPU: the reference while the (n, L, L) bias is small, and always decomposed
    assert choose_backend(torch.zeros(8, 4, 784, 32, device="meta"), fixed, (28, 28), "decomposed") == "reference"
    assert choose_backend(torch.zeros(8, 8, 196, 32, device="meta"), torch.zeros(1, 8, 1), grid3, "full") == "reference"
    assert choose_backend(stage1, None, grid1, "full") == "reference"
    # other devices (meta stands in for CUDA's rules below flex)
    meta = torch.zeros(8, 4, 3136, 16, device="meta")
    assert choose_backend(meta, cag, grid1, "full") == "chunked"
    assert choose_backend(meta, cag, grid1, "decomposed") == "chunked"
    assert choose_backend(torch.zeros(8, 16, 49, 16, device="meta"), torch.zeros(8, 16, 49), grid4, "full") == "reference"


@pytest.fixture(scope="module")
def fused_kernel():
    """The fused kernel must really be built here: a silent fallback to chunked would pass every test."""
    assert fused_cpu.load() is not None, f"fused CPU kernel did not build: {fused_cpu._failed}"


@pytest.mark.parametrize("rate_kind", list(RATE_SHAPES))
@pytest.mark.parametrize("distance", ["manhattan", "indicator"])
@pytest.mark.parametrize("sign", ["negative", "mixed"])
@pytest.mark.parametrize("layout", ["full", "decomposed"])
def test_fused_matches_reference(fused_kernel, rate_kind, distance, sign, layout):
    grid = (5, 7)
    q, k, v, rates = make_inputs(2, 3, grid, 8, RATE_SHAPES[rate_kind](2, 3, 35), sign)
    assert_matches_reference(using("fused"), q, k, v, rates, grid, layout, distance)
    with torch.no_grad():
        out = spatial_decay_attention(q, k, v, rates, grid, layout, distance, "fused")
    assert relative_error(out, reference_attention(q, k, v, rates, grid, layout, distance)) < F32_TOL


@pytest.mark.parametrize("grid", [(7, 9), (1, 13), (11, 1), (1, 1), (3, 3), (16, 16)])
@pytest.mark.parametrize("task_elements", [1, 40, 200, 1 << 17])
def test_fused_tasks_odd_grids_batch_one(fused_kernel, monkeypatch, grid, task_elements):
    """Task sizes that cut sequences into row blocks with a partial last one, or group whole sequences."""
    tokens = grid[0] * grid[1]
    monkeypatch.setattr(fused_cpu, "TASK_ELEMENTS", task_elements)  # read by the custom op on every call
    for batch in (1, 3):
        q, k, v, rates = make_inputs(batch, 2, grid, 4, (batch, 2, tokens), "mixed", seed=batch)
        assert_matches_reference(using("fused"), q, k, v, rates, grid)


def test_fused_bfloat16_and_long_distances(fused_kernel):
    """bf16 inputs come back in bf16; a 64x64 grid has distances up to 126 (logits far below the max)."""
    q, k, v, rates = make_inputs(1, 2, (64, 64), 16, (1, 2, 4096), dtype=torch.bfloat16)
    with torch.no_grad():
        out = spatial_decay_attention(q, k, v, rates, (64, 64), "full", "manhattan", "fused")
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference_attention(q, k, v, rates, (64, 64), "full", "manhattan")) < BF16_TOL


def test_fused_refuses_other_devices_with_a_clear_error():
    q, k, v, rates = (t.to("meta") for t in make_inputs(1, 2, (3, 4), 8, (1, 2, 12)))
    with pytest.raises(RuntimeError, match="CPU kernel and the inputs are on meta.*chunked"):
        spatial_decay_attention(q, k, v, rates, (3, 4), "full", "manhattan", "fused")


def test_fused_disabled_falls_back_to_the_chunked_loop(monkeypatch):
    monkeypatch.setenv("SDT_FUSED", "0")
    assert fused_cpu.load() is None
    q, k, v, rates = make_inputs(2, 2, (4, 5), 8, (2, 2, 20))
    with torch.no_grad():
        out = spatial_decay_attention(q, k, v, rates, (4, 5), "full", "manhattan", "fused")
    assert relative_error(out, reference_attention(q, k, v, rates, (4, 5), "full", "manhattan")) < F32_TOL
    monkeypatch.setenv("SDT_FUSED", "maybe")
    with pytest.raises(ValueError, match="SDT_FUSED='maybe'"):
        fused_cpu.load()


def test_fused_kernel_cache_is_per_cpu(monkeypatch):
    """The kernel is built with -march=native and cached under ~/.cache/torch_extensions by name: with one
    name for every CPU, a home directory carried from an AVX-512 machine to an AVX2 one (seen here between
    sessions) would load the old build, which dies of SIGILL on its first AVX-512 instruction."""
    from torch.utils import cpp_extension

    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: names.append(kwargs["name"]))
    monkeypatch.setattr(fused_cpu, "_ops", None)
    monkeypatch.setattr(fused_cpu, "_failed", None)
    monkeypatch.setenv("SDT_FUSED", "auto")
    for flags in ("fpu sse2 avx2 avx512f avx512_bf16", "fpu sse2 avx2", "fpu sse2 avx2"):
        monkeypatch.setattr(fused_cpu, "_cpu_identity", lambda flags=flags: "model name\t: AMD EPYC\nflags\t: " + flags)
        fused_cpu.load()
        monkeypatch.setattr(fused_cpu, "_ops", None)
    assert len(names) == 3 and names[0] != names[1] and names[1] == names[2], names
    assert fused_cpu._cpu_identity()  # this machine's, whatever it is


def test_building_the_fused_kernel_hides_torchs_cuda_home_warning(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is imported where
    a CUDA toolkit exists and no GPU does; the CPU-only build does not use CUDA, so users must not see it.
    A fresh interpreter (the warning comes once, at import), a CUDA_HOME that exists and no visible GPU."""
    script = ("import logging; from sdt.backends import fused_cpu; assert fused_cpu.load() is not None, fused_cpu._failed; "
              "assert not logging.getLogger('torch.utils.cpp_extension').filters; print('built')")
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "SDT_FUSED": "1"}
    env.pop("TORCH_LOGS", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "built" in result.stdout, result.stderr
    assert "No CUDA runtime" not in result.stderr + result.stdout, result.stderr


def test_fx_trace_of_the_public_function_records_the_reference():
    """Models reach spatial_decay_attention as an fx leaf (attention.py wraps it), but a user's own module
    that calls ``sdt.spatial_decay_attention`` traces through it: the fx branch of the dispatch then picks
    the reference, whose plain ops record (without it, ``auto`` would branch on a Proxy and fail)."""

    class Direct(torch.nn.Module):
        def forward(self, q, k, v, rates):
            return sdt.spatial_decay_attention(q, k, v, rates, (3, 4))

    graph = torch.fx.symbolic_trace(Direct())
    q, k, v, rates = make_inputs(2, 2, (3, 4), 8, (2, 2, 12), "mixed")
    assert relative_error(graph(q, k, v, rates), reference_attention(q, k, v, rates, (3, 4), "full", "manhattan")) < F32_TOL


def test_chunk_rows_heuristic():
    assert 0 < chunk_rows(8, 4, 3136) * 8 * 4 * 3136 <= CHUNK_ELEMENTS
    assert chunk_rows(1, 1, 10) == 10
    assert chunk_rows(64, 16, 1 << 16) == 1  # never zero rows
    assert chunk_rows(1, 1, 100, budget=1000) == 10


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3), height=st.integers(1, 6), width=st.integers(1, 6),
    dim=st.sampled_from([2, 4, 8]), rate_kind=st.sampled_from(list(RATE_SHAPES)),
    sign=st.sampled_from(["negative", "mixed"]), distance=st.sampled_from(["manhattan", "indicator"]),
    layout=st.sampled_from(["full", "decomposed"]), chunk=st.integers(1, 40), seed=st.integers(0, 2 ** 16),
)
def test_chunked_property(batch, heads, height, width, dim, rate_kind, sign, distance, layout, chunk, seed):
    grid = (height, width)
    shape = RATE_SHAPES[rate_kind](batch, heads, height * width)
    q, k, v, rates = make_inputs(batch, heads, grid, dim, shape, sign, seed=seed)
    assert_matches_reference(chunked(chunk), q, k, v, rates, grid, layout, distance)


def _randomise_gate(module: torch.nn.Module) -> None:
    """Move every gate off its RMT init so that rates differ per token, head and image."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".gate." in f".{name}":
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("layout", ["full", "decomposed"])
def test_attention_module_chunked_matches_reference(decay, layout):
    """The real DecayGate: gradients of q/k/v projections, W_g, the gate bias and alpha agree."""
    torch.manual_seed(0)
    modules = {b: SpatialDecayAttention(32, 4, decay=decay, layout=layout, backend=b) for b in ("reference", "chunked")}
    _randomise_gate(modules["reference"])
    modules["chunked"].load_state_dict(modules["reference"].state_dict())
    x = torch.randn(2, 5, 7, 32)
    outs, grads = {}, {}
    for name, module in modules.items():
        outs[name] = module(x)
        outs[name].square().mean().backward()
        grads[name] = {n: p.grad for n, p in module.named_parameters()}
    assert relative_error(outs["chunked"], outs["reference"]) < F32_TOL
    for n, ref in grads["reference"].items():
        assert relative_error(grads["chunked"][n], ref) < F32_TOL, n


def test_model_chunked_matches_reference_end_to_end():
    """sdt_h_nano_full2d with every block on the chunked backend: same logits and parameter gradients."""
    models = {b: timm.create_model("sdt_h_nano_full2d", num_classes=5, attn_backend=b, drop_path_rate=0.0)
              for b in ("reference", "chunked")}
    _randomise_gate(models["reference"])
    models["chunked"].load_state_dict(models["reference"].state_dict())
    x = torch.randn(2, 3, 18, 14)  # grids 9x7, 5x4, 3x2, 2x1
    grads = {}
    for name, model in models.items():
        model.train()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
        grads[name] = (logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert relative_error(grads["chunked"][0], grads["reference"][0]) < F32_TOL
    assert grads["chunked"][1].keys() == grads["reference"][1].keys()
    # Conv biases before BatchNorm have a true gradient of 0 (~1e-8 of rounding noise), so the
    # absolute floor is relative to the largest gradient in the model.
    floor = 1e-6 * max(g.abs().max() for g in grads["reference"][1].values())
    for n, ref in grads["reference"][1].items():
        error = (grads["chunked"][1][n] - ref).abs().max()
        assert error <= 1e-4 * ref.abs().max() + floor, n


def test_full2d_variants_use_full_layout_everywhere():
    names = timm.list_models("sdt_h_*_full2d")
    assert sorted(names) == sorted(f"sdt_h_{s}_full2d" for s in ("nano", "tiny", "small", "base", "large"))
    model = timm.create_model("sdt_h_nano_full2d")
    layouts = {block.attn.layout for stage in model.stages for block in stage.blocks}
    assert layouts == {"full"}
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in timm.create_model("sdt_h_nano").parameters())


def test_scripted_module_uses_reference_and_matches_eager():
    module = SpatialDecayAttention(16, 2, decay="cag", layout="full", backend="chunked").eval()
    _randomise_gate(module)
    x = torch.randn(1, 4, 3, 16)
    scripted = torch.jit.script(module)
    with torch.no_grad():
        assert relative_error(scripted(x), module(x)) < F32_TOL


def _flex_joint_graphs(monkeypatch, score_mod_factory, q, k, v, rates, grid):
    """Trace flex attention's forward and backward on CPU with AOTAutograd and return the score_mod joint graphs.

    PyTorch refuses CPU FlexAttention with gradients at the door (``_validate_device``); with that check
    off, the backward runs eagerly here, and the joint graph it carries is the one inductor lowers on GPU.
    """
    import torch.nn.attention.flex_attention as flex_module
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    joints = []

    def backward_compiler(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.ops.higher_order.flex_attention_backward:
                joints.append(getattr(graph_module, node.args[8].target))  # (..., fw_graph, joint_graph, ...)
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward_compiler)
    batch, heads, tokens, _ = q.shape

    def attend(q, k, v, rates):
        score_mod = score_mod_factory(rates.expand(batch, heads, tokens), grid, "manhattan")
        return flex_attention(q, k, v, score_mod=score_mod)

    torch._dynamo.reset()
    out = torch.compile(attend, backend=backend, fullgraph=True)(q, k, v, rates)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch._dynamo.reset()
    assert len(joints) == 1
    return joints, out


def test_flex_backward_graph_passes_the_joint_graph_check(monkeypatch):
    """The CUDA training path of flex: inductor's validate_joint_graph accepts our score_mod's backward
    (the rates indexed twice without a clone, as before the fix, is rejected), and the gradients are right."""
    from torch._inductor.kernel.flex.flex_attention import validate_joint_graph

    from sdt.backends.flex import decay_score_mod

    grid = (3, 4)

    def indexed_twice(rates, grid, distance):  # the score_mod before the fix
        index = torch.arange(grid[0] * grid[1])
        rows, cols = index // grid[1], index % grid[1]

        def score_mod(score, b, h, q_idx, kv_idx):
            dist = ((rows[q_idx] - rows[kv_idx]).abs() + (cols[q_idx] - cols[kv_idx]).abs()).to(torch.float32)
            return score - ((rates[b, h, q_idx] + rates[b, h, kv_idx]) * 0.5 * dist).abs()

        return score_mod

    for factory, valid in ((indexed_twice, False), (decay_score_mod, True)):
        q, k, v, rates = make_inputs(1, 2, grid, 8, (1, 2, 12), "mixed")
        leaves = [t.clone().requires_grad_() for t in (q, k, v, rates)]
        joints, out = _flex_joint_graphs(monkeypatch, factory, *leaves, grid)
        graph = joints[0].graph
        graph.eliminate_dead_code()
        if not valid:
            with pytest.raises(NotImplementedError, match="multiple indexing operations"):
                validate_joint_graph(graph)
            continue
        validate_joint_graph(graph)
        ref_out, ref_grads = outputs_and_grads(reference_attention, q, k, v, rates, grid, "full", "manhattan")
        assert relative_error(out, ref_out) < F32_TOL
        for name, leaf, ref in zip("qkv", leaves, ref_grads):
            assert relative_error(leaf.grad, ref) < F32_TOL, name
        assert relative_error(leaves[3].grad, ref_grads[3]) < F32_TOL


def test_cuda_dispatch_picks_triton_for_every_layout_and_rate_kind(monkeypatch):
    """Fake CUDA tensors (no GPU needed): auto chooses triton, and the call reaches the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import sdt.backends as backends
    from conftest import RecordOps

    grid = (8, 8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(2, 4, 64, 16, device="cuda") for _ in range(3))
        rate_kinds = {"per-token": torch.zeros(2, 4, 64, device="cuda", requires_grad=True),
                      "fixed": torch.zeros(1, 4, 1, device="cuda"),
                      "learned": torch.zeros(1, 4, 1, device="cuda", requires_grad=True)}
        for layout in ("full", "decomposed"):
            for rates in rate_kinds.values():
                assert choose_backend(q, rates, grid, layout) == "triton"
            assert choose_backend(q, None, grid, layout) == "reference"  # plain SDPA (flash)
        with RecordOps() as recorder:
            out = spatial_decay_attention(q, k, v, rate_kinds["per-token"], grid, "full")
        assert out.shape == q.shape and out.device.type == "cuda"
        assert torch.ops.sdt.spatial_decay_attention.default in recorder.ops
        # without Triton: the documented fallbacks
        monkeypatch.setattr(backends, "triton_available", lambda: False)
        assert choose_backend(q, rate_kinds["per-token"], grid, "full") == "reference"  # 2^15 bias elements
        big = torch.empty(8, 4, 3136, 16, device="cuda")
        assert choose_backend(big, torch.zeros(8, 4, 3136, device="cuda"), (56, 56), "full") == "flex"
        assert choose_backend(big, torch.zeros(8, 4, 3136, device="cuda"), (56, 56), "decomposed") == "chunked"


def test_triton_backend_refuses_cpu_with_a_clear_error():
    q, k, v, rates = make_inputs(1, 2, (3, 4), 8, (1, 2, 12))
    with pytest.raises(RuntimeError, match="runs on CUDA and the inputs are on cpu.*fused"):
        spatial_decay_attention(q, k, v, rates, (3, 4), "full", "manhattan", "triton")
