"""Training and inference images/s of sdt_h_nano vs rmt_nano on Fashion-MNIST-sized inputs.

    PYTHONPATH=src python benchmarks/train_throughput.py [--batch-size 128] [--repeats 7] [--threads 2]

A training step is forward, cross-entropy, backward and AdamW; inference is one no-grad forward,
on random (B, 1, size, size) inputs. The models are timed in one process, interleaved (see
_measure.py), so load from other processes hits both alike; the table gives the median images/s
and the ratio to the last model named.
"""
import argparse
from typing import Callable, Dict

import timm
import torch

import sdt  # noqa: F401  (registers the models)
from _measure import environment, interleaved_medians, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sdt_h_nano", "rmt_nano"])
    parser.add_argument("--batch-size", type=int, default=128, help="default: the fashion-mnist recipe's")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {name: timm.create_model(name, in_chans=1, num_classes=10) for name in args.models}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def train_step(name: str) -> Callable[[], None]:
        def step() -> None:
            models[name].train()
            loss = torch.nn.functional.cross_entropy(models[name](x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return step

    def infer(name: str) -> Callable[[], None]:
        def call() -> None:
            models[name].eval()
            with torch.no_grad():
                models[name](x)
        return call

    cases: Dict[str, Callable[[], None]] = {}
    for name in models:
        cases[f"train {name}"] = train_step(name)
        cases[f"infer {name}"] = infer(name)
    seconds = interleaved_medians(cases, args.repeats)
    base = args.models[-1]
    print(f"batch {args.batch_size}, {args.size}x{args.size}x1, median of {args.repeats} interleaved rounds; "
          f"{environment()}")
    rows = []
    for name in models:
        train, inference = args.batch_size / seconds[f"train {name}"], args.batch_size / seconds[f"infer {name}"]
        rows.append([f"`{name}`", f"{train:.0f}", f"{seconds[f'train {base}'] / seconds[f'train {name}']:.2f}x",
                     f"{inference:.0f}", f"{seconds[f'infer {base}'] / seconds[f'infer {name}']:.2f}x"])
    print(markdown_table(["model", "train images/s", f"vs {base}", "inference images/s", f"vs {base}"], rows))


if __name__ == "__main__":
    main()
