"""Training and sampling throughput of one DiT config with vanilla / fixed / cag attention.

The three models are timed in one process, interleaved (vanilla, fixed, cag, vanilla, ...) for
``--repeats`` rounds; the table gives the median images/s and the ratio to vanilla, so that load
from other processes on a shared machine hits all three alike.

    PYTHONPATH=src python benchmarks/dit_throughput.py --model dit_n_4 --batch-size 64 --repeats 7 --threads 1
"""
import argparse
import statistics
import time

import torch

from sdt.diffusion import create_objective
from sdt.models.dit import ATTN_DECAY, create_dit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit_n_4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {attn: create_dit(args.model, attn=attn) for attn in ATTN_DECAY}
    optimizers = {attn: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0) for attn, m in models.items()}
    objective = create_objective("ddpm")
    first = next(iter(models.values()))
    x = torch.rand(args.batch_size, first.in_channels, *first.x_embedder.img_size) * 2 - 1
    y = torch.randint(0, first.num_classes, (args.batch_size,))
    t = torch.randint(0, 1000, (args.batch_size,))
    train, sample = {a: [] for a in models}, {a: [] for a in models}
    for repeat in range(args.repeats + 1):  # round 0 is warm-up
        for attn, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = objective.training_losses(model, x, y)["loss"].mean()
            optimizers[attn].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[attn].step()
            train_s = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                model(x, t, y)
            sample_s = time.perf_counter() - start
            if repeat:
                train[attn].append(args.batch_size / train_s)
                sample[attn].append(args.batch_size / sample_s)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats} interleaved rounds")
    print("| attn | train img/s | ratio | forward img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    base_train, base_fwd = statistics.median(train["vanilla"]), statistics.median(sample["vanilla"])
    for attn in models:
        tr, fw = statistics.median(train[attn]), statistics.median(sample[attn])
        print(f"| {attn} | {tr:.1f} | {tr / base_train:.2f} | {fw:.1f} | {fw / base_fwd:.2f} |")


if __name__ == "__main__":
    main()
