"""GPU benchmark of spatial-decay attention and of whole models (issue 16), bf16, one run.

Layers, bf16 q/k/v, full 2D layout:
- stage1: SDT-H-T stage 1 at 224x224, batch 8, 4 heads, head dim 16, 56x56 grid;
- dit: the DiT shape, batch 32, 6 heads, head dim 64, 16x16 grid.
Cases: SDPA without a bias on its flash kernel (the ceiling), and spatial-decay attention with
CAG rates (per token, float32, learned: they get a gradient in forward+backward) on the reference,
chunked and triton backends, and with fixed per-head (RMT) rates on flex and triton. "x flash" is
the throughput ratio to SDPA-flash, sdpa_ms / case_ms (1.0 = as fast as flash, higher is faster).
"fwd err" is the largest error of the forward output relative to the largest value of a float32
reference with the same rates. Times: CUDA events around ``--reps`` calls, after a warm-up call
(compiling and autotuning), cases interleaved round by round, median of ``--rounds``. A case
that fails is reported in the table with its error instead of stopping the run.

Models: ``sdt_h_tiny`` vs ``rmt_tiny`` training images/s at batch 128, 224x224, bf16 autocast
(forward, cross-entropy, backward, AdamW), interleaved, median; ``--skip-models`` leaves them out.

    python benchmarks/bench_gpu.py [--rounds 10] [--skip-models] [--out results.md]
"""
import argparse
import statistics
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from _measure import markdown_table

# name: (batch, heads, head_dim, H, W, heads_range)
SHAPES: Dict[str, Tuple[int, int, int, int, int, float]] = {
    "stage1": (8, 4, 16, 56, 56, 4.0),
    "dit": (32, 6, 64, 16, 16, 4.0),
}
# case: (rates kind, backend)
CASES = {
    "sdpa flash (no bias)": (None, "sdpa"),
    "reference (cag)": ("cag", "reference"),
    "chunked (cag)": ("cag", "chunked"),
    "triton (cag)": ("cag", "triton"),
    "flex (fixed)": ("fixed", "flex"),
    "triton (fixed)": ("fixed", "triton"),
}


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:90]}"


def attention_fn(backend: str) -> Callable:
    """(q, k, v, rates, grid) -> out for a backend name; 'sdpa' is plain SDPA pinned to its flash kernel."""
    if backend == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v, rates, grid):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return sdpa
    from sdt.backends import BACKENDS, spatial_decay_attention

    if backend == "triton" and "triton" not in BACKENDS:  # before the backend was registered
        from sdt.backends.ops import op_kernel

        return lambda q, k, v, rates, grid: op_kernel(q, k, v, rates, grid, "manhattan")
    return lambda q, k, v, rates, grid: spatial_decay_attention(q, k, v, rates, grid, "full", "manhattan", backend)


def make_inputs(batch: int, heads: int, dim: int, height: int, width: int, heads_range: float):
    """bf16 q, k, v (B, n, L, d); float32 rates: fixed (1, n, 1) and CAG-like (B, n, L), all < 0."""
    from sdt.decay import decay_rates

    tokens = height * width
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
               for _ in range(3))
    fixed = decay_rates(heads, 2.0, heads_range).view(1, heads, 1).cuda()
    cag = fixed * (0.5 + torch.rand(batch, heads, tokens, device="cuda", generator=generator))
    return q, k, v, {"fixed": fixed, "cag": cag, None: None}


def time_cases(cases: Dict[str, Callable[[], object]], rounds: int, reps: int, failures: Dict[str, str]
               ) -> Dict[str, float]:
    """Median ms per call of each case (see the module docstring); failing cases go to ``failures``."""
    live = {}
    for name, fn in cases.items():
        try:
            fn()  # warm-up: compiles and autotunes
            torch.cuda.synchronize()
            live[name] = fn
        except Exception as error:  # noqa: BLE001  reported in the table
            failures[name] = _short(error)
            torch.cuda.empty_cache()
    times: Dict[str, List[float]] = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in list(live.items()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                start.record()
                for _ in range(reps):
                    fn()
                end.record()
                end.synchronize()
            except Exception as error:  # noqa: BLE001
                failures[name] = _short(error)
                del live[name], times[name]
                continue
            times[name].append(start.elapsed_time(end) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def bench_layer(name: str, rounds: int, reps: int) -> str:
    from sdt.backends.reference import reference_attention

    batch, heads, dim, height, width, heads_range = SHAPES[name]
    grid = (height, width)
    q, k, v, rates = make_inputs(batch, heads, dim, height, width, heads_range)
    grad_out = torch.randn_like(q)
    failures: Dict[str, str] = {}
    forward: Dict[str, Callable[[], object]] = {}
    train: Dict[str, Callable[[], object]] = {}
    errors: Dict[str, str] = {}
    references: Dict[Optional[str], torch.Tensor] = {}
    for case, (kind, backend) in CASES.items():
        try:
            fn = attention_fn(backend)
        except Exception as error:  # noqa: BLE001
            failures[case] = _short(error)
            continue
        r = rates[kind]

        def run_forward(fn=fn, r=r):
            with torch.no_grad():
                return fn(q, k, v, r, grid)

        def run_train(fn=fn, r=r, kind=kind):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            learned = None if r is None else r.detach().requires_grad_(kind == "cag")
            fn(*leaves, learned, grid).backward(grad_out)

        forward[case], train[case] = run_forward, run_train
        try:
            if kind not in references:
                with torch.no_grad():
                    references[kind] = reference_attention(q.float(), k.float(), v.float(), r, grid, "full",
                                                           "manhattan")
            out = run_forward().float()
            errors[case] = f"{((out - references[kind]).abs().max() / references[kind].abs().max()).item():.1e}"
        except Exception:  # noqa: BLE001  (timing below reports it)
            errors[case] = "-"
    references.clear()
    forward_ms = time_cases(forward, rounds, reps, failures)
    train_failures: Dict[str, str] = {}
    train_ms = time_cases(train, rounds, reps, train_failures)
    memory = {}
    for case, fn in train.items():
        if case in train_ms:
            memory[case] = peak_gib(fn)
    base_forward, base_train = forward_ms.get("sdpa flash (no bias)"), train_ms.get("sdpa flash (no bias)")
    rows = []
    for case in CASES:
        if case in failures and case not in forward_ms:
            rows.append([case, "failed", "-", "-", "-", "-", "-"])
            continue
        row = [case, f"{forward_ms[case]:.3f}", f"{base_forward / forward_ms[case]:.2f}" if base_forward else "-"]
        if case in train_ms:
            row += [f"{train_ms[case]:.3f}", f"{base_train / train_ms[case]:.2f}" if base_train else "-",
                    f"{memory[case]:.2f}"]
        else:
            row += ["failed", "-", "-"]
        rows.append(row + [errors.get(case, "-")])
    title = (f"### {name}: batch {batch}, {heads} heads, head dim {dim}, {height}x{width} grid (L={height * width}), "
             f"bf16, median of {rounds} rounds x {reps} calls")
    header = ["case", "fwd ms", "fwd x flash", "fwd+bwd ms", "fwd+bwd x flash", "fwd+bwd peak GiB", "fwd err"]
    text = title + "\n\n" + markdown_table(header, rows)
    notes = [f"- {case} forward: {message}" for case, message in failures.items()]
    notes += [f"- {case} forward+backward: {message}" for case, message in train_failures.items()]
    return text + ("\n\nFailures:\n" + "\n".join(notes) if notes else "")


def bench_models(names: List[str], batch: int, rounds: int, compile_models: bool) -> str:
    import timm

    import sdt  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    steps: Dict[str, Callable[[], object]] = {}
    failures: Dict[str, str] = {}
    for name in names:
        try:
            model = timm.create_model(name, num_classes=1000).cuda().train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            forward = torch.compile(model) if compile_models else model

            def step(model=model, forward=forward, optimizer=optimizer):
                with torch.autocast("cuda", torch.bfloat16):
                    loss = F.cross_entropy(forward(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            steps[name] = step
        except Exception as error:  # noqa: BLE001
            failures[name] = _short(error)
    ms = time_cases(steps, rounds, 1, failures)
    base = names[-1]
    rows = []
    for name in names:
        if name not in ms:
            rows.append([f"`{name}`", "failed", "-"])
            continue
        ratio = f"{ms[base] / ms[name]:.2f}" if base in ms else "-"
        rows.append([f"`{name}`", f"{batch / ms[name] * 1e3:.0f}", ratio])
    title = (f"### models: training images/s, batch {batch}, 224x224, bf16 autocast, AdamW"
             f"{', torch.compile' if compile_models else ''}; median of {rounds} interleaved steps")
    text = title + "\n\n" + markdown_table(["model", "train images/s", f"x {base}"], rows)
    notes = [f"- {name}: {message}" for name, message in failures.items()]
    return text + ("\n\nFailures:\n" + "\n".join(notes) if notes else "")


def environment() -> str:
    import time

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"triton {triton_version}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per case (after one warm-up call)")
    parser.add_argument("--reps", type=int, default=5, help="layer calls per timed round")
    parser.add_argument("--skip-models", action="store_true", help="only the layer tables")
    parser.add_argument("--models", nargs="+", default=["sdt_h_tiny", "rmt_tiny"],
                        help="models to train (the ratio is to the last one)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model-rounds", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here "
                 "(for CPU numbers use benchmarks/bench_attention.py and bench_models.py)")
    sections = [environment()]
    print(sections[0], flush=True)
    jobs = [(f"layer {name}", lambda name=name: bench_layer(name, args.rounds, args.reps)) for name in args.shapes]
    if not args.skip_models:
        jobs.append(("models", lambda: bench_models(args.models, args.batch_size, args.model_rounds, args.compile)))
    for label, job in jobs:
        try:
            section = job()
        except Exception:  # noqa: BLE001  one broken section must not lose the others
            section = f"### {label}: failed\n\n```\n{traceback.format_exc(limit=6)}```"
        torch.cuda.empty_cache()
        sections.append(section)
        print("\n" + section, flush=True)
        if args.out:  # after every section, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
