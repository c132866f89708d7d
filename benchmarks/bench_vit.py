"""Training cost of the plain-ViT variants (issue 18): images/s of forward + backward + SGD step.

    python benchmarks/bench_vit.py                       # sdt_vit_fm_tiny, batch 64, 1 thread
    python benchmarks/bench_vit.py --model sdt_vit_fm_small --rounds 20

Cases, all interleaved round by round in one process (see _measure.py): no decay and no position
information (plain attention), ``cag`` (the fused CPU kernel via the ``auto`` backend, and on the
reference backend: the materialised bias and SDPA), ``fixed``,
and the standard ViT (learned position embedding, no decay). The ratio column is each case's time
over the no-decay case; "speed vs fixed" is images/s over fixed decay's (issue 30's target for cag:
at least 0.9x). Numbers from a shared machine are indicative only: the table prints the load.
"""
import argparse

import timm
import torch

import sdt  # noqa: F401  registers the models
from _measure import environment, interleaved_medians, load_average, markdown_table, train_step

CASES = {
    "none (no position info)": dict(decay="none", pos_embed="none"),
    "cag (fused kernel)": dict(decay="cag", pos_embed="none"),
    "cag (reference: materialised bias + SDPA)": dict(decay="cag", pos_embed="none", attn_backend="reference"),
    "fixed": dict(decay="fixed", pos_embed="none"),
    "learned pos, no decay (ViT)": dict(decay="none", pos_embed="learned"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdt_vit_fm_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {}
    for name, kwargs in CASES.items():
        model = timm.create_model(args.model, **kwargs).train()
        cfg = model.pretrained_cfg
        x = torch.randn(args.batch, *cfg["input_size"])
        y = torch.randint(0, model.num_classes, (args.batch,))
        steps[name] = train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=1e-3))
    load_before = load_average()
    seconds = interleaved_medians(steps, args.rounds, warmup=2)
    base = seconds["none (no position info)"]
    rows = [[name, f"{args.batch / s:.1f}", f"{s * 1000:.0f}", f"{s / base:.2f}x", f"{seconds['fixed'] / s:.2f}x"]
            for name, s in seconds.items()]
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), fwd+bwd+step, median of {args.rounds} rounds")
    print(environment())
    print(f"before: {load_before}; after: {load_average()}")
    print(markdown_table(["variant", "img/s", "ms/step", "time vs none", "speed vs fixed"], rows))


if __name__ == "__main__":
    main()
