"""Whole models at 224x224: images/s for inference and for a training step, and peak memory.

SDT-H-T, RMT-T and SDT-H-T-full2d with each attention backend (``auto`` picks per layer), beside
timm's DeiT-S and Swin-T as familiar references. Times are medians over interleaved rounds.
``--compile`` adds ``torch.compile`` (inductor) rows for the models named with it (compiled before
timing, in both modes; ``auto`` then runs the fused custom op, as eager does).

    PYTHONPATH=src python benchmarks/bench_models.py                 # batch 16, 2 rounds
    PYTHONPATH=src python benchmarks/bench_models.py --batch 4 --rounds 1
    PYTHONPATH=src python benchmarks/bench_models.py --compile sdt_h_tiny rmt_tiny
"""
import argparse
from typing import Callable, Dict, List, Tuple

import timm
import torch

import sdt  # noqa: F401  registers the models
from _measure import environment, interleaved_medians, markdown_table, peak_memory_gib, train_step

# (label, timm name, kwargs)
MODELS: List[Tuple[str, str, dict]] = [
    ("rmt_tiny", "rmt_tiny", {}),
    ("sdt_h_tiny (auto)", "sdt_h_tiny", {"attn_backend": "auto"}),
    ("sdt_h_tiny (reference)", "sdt_h_tiny", {"attn_backend": "reference"}),
    ("sdt_h_tiny (chunked)", "sdt_h_tiny", {"attn_backend": "chunked"}),
    ("sdt_h_tiny (fused)", "sdt_h_tiny", {"attn_backend": "fused"}),
    ("sdt_h_tiny_full2d (auto)", "sdt_h_tiny_full2d", {"attn_backend": "auto"}),
    ("sdt_h_tiny_full2d (reference)", "sdt_h_tiny_full2d", {"attn_backend": "reference"}),
    ("deit_small_patch16_224", "deit_small_patch16_224", {}),
    ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", {}),
]


def step_fns(model: torch.nn.Module, batch: int,
             compiled: bool = False) -> Tuple[Callable[[], None], Callable[[], None]]:
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model

    def infer():
        model.eval()
        with torch.no_grad():
            forward(images)

    return infer, train_step(model, images, labels, optimizer, forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="labels to leave out")
    parser.add_argument("--compile", nargs="*", default=[], metavar="NAME",
                        help="timm names (of MODELS) to add compiled rows for, e.g. sdt_h_tiny rmt_tiny")
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels (and the compiled rows)")
    parser.add_argument("--skip-train", nargs="*", default=["sdt_h_tiny_full2d (reference)"],
                        help="labels to time for inference only (default: the materialised full-2D "
                             "reference, whose training step needs tens of GB at batch 16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment(), f"batch {args.batch}, {args.rounds} rounds", flush=True)
    torch.manual_seed(0)
    fns: Dict[str, Dict[str, Callable[[], None]]] = {"infer": {}, "train": {}}
    cases = [(label, name, kwargs, False) for label, name, kwargs in MODELS
             if label not in args.skip and (args.only is None or label in args.only)]
    cases += [(f"{name} (compiled)", name, {}, True) for name in args.compile]
    for label, name, kwargs, compiled in cases:
        infer, train = step_fns(timm.create_model(name, **kwargs), args.batch, compiled)
        if compiled:  # compile both graphs (eval and train) before anything is timed
            infer()
            train()
        fns["infer"][label] = infer
        if label not in args.skip_train:
            fns["train"][label] = train
    results: Dict[str, Dict[str, float]] = {label: {} for label in fns["infer"]}
    for mode, cases in fns.items():
        times = interleaved_medians(cases, args.rounds)
        for label, fn in cases.items():
            results[label][mode] = args.batch / times[label]
            results[label][mode + "_gib"] = peak_memory_gib(fn)
        print(f"{mode} done", flush=True)
    base = results.get("rmt_tiny")
    rows = []
    for label, r in results.items():
        row = [label]
        for mode in ("infer", "train"):
            if mode in r:
                row += [f"{r[mode]:.1f}", f"{r[mode] / base[mode]:.2f}" if base else "-", f"{r[mode + '_gib']:.2f}"]
            else:
                row += ["skipped", "-", "-"]
        rows.append(row)
    print()
    print(markdown_table(["model (backend)", "infer img/s", "x rmt_tiny", "infer peak GiB",
                          "train img/s", "x rmt_tiny", "train peak GiB"], rows))


if __name__ == "__main__":
    main()
