"""Training and inference images/s of sdt_h_nano vs rmt_nano on Fashion-MNIST-sized inputs.

    PYTHONPATH=src python benchmarks/train_throughput.py [--batch-size 64] [--repeats 5] [--size 28]

Measures a full training step (forward, backward, AdamW) and an inference forward pass on random
(B, 1, size, size) inputs, the two models interleaved in one process (A B A B ...) so that load
from other processes hits both alike; prints the median of the repeats and the SDT/RMT ratio.
"""
import argparse
import statistics
import time

import timm
import torch

import sdt  # noqa: F401  (registers the models)


def time_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - start)


@torch.no_grad()
def time_infer(model: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    model.eval()
    start = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sdt_h_nano", "rmt_nano"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {n: timm.create_model(n, in_chans=1, num_classes=10) for n in args.models}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    for n, m in models.items():  # warm-up
        time_train(m, x, y, opts[n], 1)
        time_infer(m, x, 1)
    train = {n: [] for n in models}
    infer = {n: [] for n in models}
    for _ in range(args.repeats):
        for n, m in models.items():
            train[n].append(time_train(m, x, y, opts[n], args.steps))
            infer[n].append(time_infer(m, x, args.steps))
    base = args.models[-1]
    print(f"batch {args.batch_size}, {args.size}x{args.size}x1, {args.threads} threads, median of {args.repeats} "
          f"interleaved repeats of {args.steps} steps\n")
    print(f"| model | train images/s | inference images/s | train vs {base} | inference vs {base} |")
    print("|---|---:|---:|---:|---:|")
    for n in models:
        t, i = statistics.median(train[n]), statistics.median(infer[n])
        tb, ib = statistics.median(train[base]), statistics.median(infer[base])
        print(f"| `{n}` | {t:.0f} | {i:.0f} | {t / tb:.2f}x | {i / ib:.2f}x |")


if __name__ == "__main__":
    main()
