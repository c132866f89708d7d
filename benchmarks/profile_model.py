"""Self CPU time by op of one model's inference (or training step) under torch.profiler.

    PYTHONPATH=src python benchmarks/profile_model.py                      # sdt_h_tiny, fp32, batch 16
    PYTHONPATH=src python benchmarks/profile_model.py --bf16 --top 15
    PYTHONPATH=src python benchmarks/profile_model.py --train --batch 8

Two warm-up calls, then ``--calls`` profiled calls; the table lists the ops with the largest self
CPU time, their share of the total, their call count and microseconds per call.
"""
import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import sdt  # noqa: F401  registers the models
from _measure import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdt_h_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="under torch.autocast('cpu', torch.bfloat16)")
    parser.add_argument("--train", action="store_true", help="a forward + backward step instead of inference")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    model.train(args.train)
    images = torch.randn(args.batch, 3, args.size, args.size)

    def call():
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16), torch.set_grad_enabled(args.train):
            out = model(images)
            if args.train:
                out.float().logsumexp(-1).mean().backward()

    for _ in range(2):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            call()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    mode = "training step" if args.train else "inference"
    print(environment())
    print(f"{args.model} {mode}, {'bf16 autocast' if args.bf16 else 'fp32'}, batch {args.batch}, "
          f"{args.size}x{args.size}: {total / 1e3 / args.calls:.0f} ms self CPU per call\n")
    print("| op | share | calls per step | us per call |")
    print("|---|---:|---:|---:|")
    for e in events[:args.top]:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count // args.calls} | "
              f"{e.self_cpu_time_total / e.count:.0f} |")


if __name__ == "__main__":
    main()
