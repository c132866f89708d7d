"""torch.compile (default inductor backend) vs eager, inference, on this machine.

    python benchmarks/bench_compile.py [--threads 2] [--repeats 7]

Prints a markdown table: eager and compiled time per batch (median of interleaved repeats),
speed-up, and the largest output difference. Both run in this one process, back to back.
"""
import argparse
import statistics
import time

import timm
import torch

import sdt  # noqa: F401  (registers the models)

CASES = [  # name, batch, (C, H, W), model kwargs
    ("sdt_h_nano", 64, (1, 28, 28), dict(num_classes=10, in_chans=1)),
    ("sdt_h_tiny", 4, (3, 224, 224), dict()),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, inference (no_grad)\n")
    print("| model | batch x input | eager ms | compiled ms | speed-up | compile s | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, batch, size, kwargs in CASES:
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
            for _ in range(args.repeats):
                for fn, times in ((model, eager), (compiled, comp)):
                    start = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - start)
        e, c = statistics.median(eager) * 1e3, statistics.median(comp) * 1e3
        diff = (out_compiled - out_eager).abs().max().item()
        print(f"| `{name}` | {batch} x {size} | {e:.1f} | {c:.1f} | {e / c:.2f}x | {compile_s:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
