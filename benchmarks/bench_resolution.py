"""Resolution scaling of SDT-H-T and SDT-H-T-full2d inference (batch 1): time and peak memory per
backend from 224x224 to 1024x1024 (and non-square inputs), with a PNG plot of both curves.

The reference backend materialises a (B, n, L, L) float32 bias per full-2D layer; it is skipped
(and the table says how much memory it would need) when that bias alone exceeds ``--max-bias-gib``.

    PYTHONPATH=src python benchmarks/bench_resolution.py --plot docs/resolution.png
"""
import argparse
import math
import os
import tempfile
from typing import Dict, List, Tuple

import timm
import torch

import sdt  # noqa: F401  registers the models
from _measure import environment, interleaved_medians, markdown_table, peak_memory_gib

SIZES: List[Tuple[int, int]] = [(224, 224), (384, 384), (512, 512), (384, 768), (768, 768), (1024, 1024)]
CASES = [("sdt_h_tiny", "reference"), ("sdt_h_tiny", "chunked"), ("sdt_h_tiny", "fused"),
         ("sdt_h_tiny_full2d", "reference"), ("sdt_h_tiny_full2d", "chunked"), ("sdt_h_tiny_full2d", "fused")]


def largest_bias_gib(model: torch.nn.Module, size: Tuple[int, int]) -> float:
    """The largest full-2D bias (GiB, float32, batch 1) the reference backend would build in this model."""
    height, width = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    largest = 0.0
    for i, stage in enumerate(model.stages):
        if i > 0:
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        attn = stage.blocks[0].attn
        if attn.layout == "full":
            largest = max(largest, attn.num_heads * (height * width) ** 2 * 4 / 2 ** 30)
    return largest


def save_plot(results: Dict[Tuple[str, str], Dict[Tuple[int, int], Tuple[float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, backend), points in results.items():
        sizes = sorted(points, key=lambda s: s[0] * s[1])
        megapixels = [s[0] * s[1] / 1e6 for s in sizes]
        style = {"chunked": "-o", "fused": "-^"}.get(backend, "--s")
        ax_time.plot(megapixels, [points[s][0] for s in sizes], style, label=f"{name} ({backend})")
        ax_mem.plot(megapixels, [points[s][1] for s in sizes], style, label=f"{name} ({backend})")
    ax_time.set(xlabel="input megapixels", ylabel="seconds per image (batch 1)", title="inference time",
                xscale="log", yscale="log")
    ax_mem.set(xlabel="input megapixels", ylabel="peak extra memory (GiB)", title="inference peak memory",
               xscale="log", yscale="log")
    for ax in (ax_time, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in SIZES], help="HxW inputs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-bias-gib", type=float, default=4.0,
                        help="skip the reference backend where one layer's bias alone would exceed this")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    parser.add_argument("--backends", nargs="+", default=sorted({b for _, b in CASES}), help="backends to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment(), flush=True)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    cases = [(name, backend) for name, backend in CASES if backend in args.backends]
    models = {case: timm.create_model(case[0], attn_backend=case[1]).eval() for case in cases}
    results: Dict[Tuple[str, str], Dict[Tuple[int, int], Tuple[float, float]]] = {case: {} for case in cases}
    rows = []
    for size in sizes:
        image = torch.randn(1, 3, *size)
        runnable, skipped = {}, {}
        for case, model in models.items():
            bias_gib = largest_bias_gib(model, size)
            if case[1] == "reference" and bias_gib > args.max_bias_gib:
                skipped[case] = bias_gib
                continue
            runnable[case] = (lambda m, x: lambda: m(x))(model, image)
        with torch.no_grad():
            times = interleaved_medians(runnable, args.rounds, warmup=0)
            for case, fn in runnable.items():
                memory = peak_memory_gib(fn)
                results[case][size] = (times[case], memory)
                rows.append([f"{size[0]}x{size[1]}", f"{case[0]} ({case[1]})", f"{times[case]:.2f}", f"{memory:.2f}"])
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
        for case, bias_gib in skipped.items():
            rows.append([f"{size[0]}x{size[1]}", f"{case[0]} ({case[1]})", "skipped",
                         f"one layer's bias alone: {bias_gib:.1f}"])

    print()
    print(markdown_table(["input", "model (backend)", "s / image", "peak extra GiB"], rows))
    if args.plot:
        save_plot({case: points for case, points in results.items() if points}, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
