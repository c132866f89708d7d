"""Training and forward throughput of one DiT config with none (plain DiT) / fixed / cag attention.

The three models are timed in one process, interleaved (none, fixed, cag, none, ...) for
``--repeats`` rounds; the table gives the median images/s and the ratio to none, so that load
from other processes on a shared machine hits all three alike. A training step is the objective's
loss, backward and AdamW; the forward is one no-grad call (one step of a sampler without guidance).

    PYTHONPATH=src python benchmarks/dit_throughput.py --model dit_n_4 --batch-size 128 --threads 2
    PYTHONPATH=src python benchmarks/dit_throughput.py --model dit_s_2 --device cuda --amp bf16 --batch-size 256
"""
import argparse
import contextlib
from typing import Callable, Dict

import torch

from _measure import environment, interleaved_medians, markdown_table
from sdt.tasks.diffusion import create_objective
from sdt.models.dit import create_dit

KINDS = ("none", "fixed", "cag")  # plain DiT, RMT's decay, SDT's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit_n_4")
    parser.add_argument("--objective", default="flow", choices=("flow", "ddpm"), help="default: the CPU recipe's")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    models = {attn: create_dit(args.model, decay=attn).to(device) for attn in KINDS}
    optimizers = {attn: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0) for attn, m in models.items()}
    objective = create_objective(args.objective)
    first = next(iter(models.values()))
    x = torch.rand(args.batch_size, first.in_channels, *first.x_embedder.img_size, device=device) * 2 - 1
    y = torch.randint(0, first.num_classes, (args.batch_size,), device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    def autocast() -> contextlib.AbstractContextManager:
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(attn: str) -> Callable[[], None]:
        def step() -> None:
            models[attn].train()
            with autocast():
                loss = objective.training_losses(models[attn], x, y)["loss"].mean()
            optimizers[attn].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[attn].step()
        return step

    def forward(attn: str) -> Callable[[], None]:
        def call() -> None:
            models[attn].eval()
            with torch.no_grad(), autocast():
                models[attn](x, t, y)
        return call

    cases: Dict[str, Callable[[], None]] = {}
    for attn in models:
        cases[f"train {attn}"] = train_step(attn)
        cases[f"forward {attn}"] = forward(attn)
    seconds = interleaved_medians(cases, args.repeats, device=device.type)
    print(f"{args.model} ({args.objective}), batch {args.batch_size}, {device}, amp {args.amp}, "
          f"median of {args.repeats} interleaved rounds; {environment()}")
    rows = []
    for attn in models:
        train, fwd = args.batch_size / seconds[f"train {attn}"], args.batch_size / seconds[f"forward {attn}"]
        train_ratio = seconds["train none"] / seconds[f"train {attn}"]
        fwd_ratio = seconds["forward none"] / seconds[f"forward {attn}"]
        rows.append([attn, f"{train:.1f}", f"{train_ratio:.2f}", f"{fwd:.1f}", f"{fwd_ratio:.2f}"])
    print(markdown_table(["attn", "train img/s", "vs none", "forward img/s", "vs none"], rows))


if __name__ == "__main__":
    main()
