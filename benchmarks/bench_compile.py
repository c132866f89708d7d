"""torch.compile (default inductor backend) vs eager, inference, on this machine.

    PYTHONPATH=src python benchmarks/bench_compile.py [--threads 2] [--repeats 7]
    PYTHONPATH=src python benchmarks/bench_compile.py --memory-size 1024        # + the memory table
    PYTHONPATH=src python benchmarks/bench_compile.py --models sdt_h_nano --repeats 1 --memory-size 64  # smoke

Speed table: eager and compiled time per batch (median of interleaved repeats), speed-up (target for
``sdt_h_tiny``: at least 1.0x), compile time and the largest output difference; both in this one
process, back to back. Memory table (``--memory-size``): ``sdt_h_tiny_full2d`` at batch 1 and that
input size, the growth of peak RSS over the resident set during one call (``_measure.py``), eager and
compiled, after a first compiled call (target at 1024x1024: compiled within 1 GiB extra). Under
``torch.compile`` the attention is the fused custom op (``sdt.backends.ops``), as in eager mode.
"""
import argparse
import statistics
import time

import timm
import torch

import sdt  # noqa: F401  (registers the models)
from _measure import environment, markdown_table, peak_memory_gib

CASES = {  # name: (batch, (C, H, W), model kwargs)
    "sdt_h_nano": (64, (1, 28, 28), dict(num_classes=10, in_chans=1)),
    "sdt_h_tiny": (4, (3, 224, 224), dict()),
    "sdt_h_tiny_full2d": (4, (3, 224, 224), dict()),
    "rmt_tiny": (4, (3, 224, 224), dict()),
}


def speed_row(name: str, repeats: int) -> list:
    batch, size, kwargs = CASES[name]
    # Each model compiles from scratch, as in a process of its own: the models share forward code, and
    # dynamo, seeing it again at another input size, would compile the next one with dynamic shapes.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(batch, *size)
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        out_compiled = compiled(x)
        compile_s = time.perf_counter() - start
        out_eager = model(x)
        eager, comp = [], []
        for _ in range(repeats):
            for fn, times in ((model, eager), (compiled, comp)):
                start = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - start)
    e, c = statistics.median(eager) * 1e3, statistics.median(comp) * 1e3
    diff = (out_compiled - out_eager).abs().max().item()
    return [f"`{name}`", f"{batch} x {size}", f"{e:.1f}", f"{c:.1f}", f"{e / c:.2f}x", f"{compile_s:.0f}",
            f"{diff:.1e}"]


def memory_rows(size: int) -> list:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = timm.create_model("sdt_h_tiny_full2d").eval()
    x = torch.randn(1, 3, size, size)
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x)  # compiles; its memory is not the model's
        compile_s = time.perf_counter() - start
        rows = []
        for label, fn in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            gib = peak_memory_gib(lambda: fn(x))  # noqa: B023  (called within this iteration)
            rows.append([f"`sdt_h_tiny_full2d` ({label})", f"1 x (3, {size}, {size})", f"{gib:.2f}",
                         f"{time.perf_counter() - start:.1f}"])
    rows[1][-1] += f" (compile {compile_s:.0f} s)"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=["sdt_h_nano", "sdt_h_tiny"], choices=list(CASES),
                        help="models of the speed table (none: skip it)")
    parser.add_argument("--memory-size", type=int, default=0,
                        help="input side of the sdt_h_tiny_full2d memory table (0: skip; the target is at 1024)")
    parser.add_argument("--freezing", action="store_true",
                        help="inductor's freezing (weights folded as constants, oneDNN prepacked: PyTorch's advice for "
                             "CPU inference; without it convolutions and GEMMs re-layout their weights every call)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    print(environment(), "float32, inference (no_grad)", "freezing" if args.freezing else "no freezing", "\n", flush=True)
    if args.models:
        rows = [speed_row(name, args.repeats) for name in args.models]
        print(markdown_table(["model", "batch x input", "eager ms", "compiled ms", "speed-up", "compile s",
                              "max abs diff"], rows), flush=True)
    if args.memory_size:
        print()
        print(markdown_table(["model", "batch x input", "peak extra GiB", "s per call"], memory_rows(args.memory_size)))


if __name__ == "__main__":
    main()
