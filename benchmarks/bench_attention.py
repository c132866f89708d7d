"""One spatial-decay attention layer per backend: time and peak memory, forward and forward+backward.

Shapes: each SDT-H-T stage at 224x224 (batch 8), a DiT shape (batch 32, 6 heads, d 64, 16x16)
and the first three nano stages on 28x28 images (batch 128; not run by default).
Cases: plain SDPA without decay (the ceiling), fixed (RMT) decay and CAG decay in the full 2D
layout with each backend, and both decays in the decomposed layout (``fused`` runs on CPU only,
``triton`` on CUDA only; ``--flex`` adds FlexAttention, forward+backward on CUDA).
Times are medians over interleaved rounds; "x sdpa" is the ratio to plain SDPA in the same run.

    PYTHONPATH=src python benchmarks/bench_attention.py                # all shapes
    PYTHONPATH=src python benchmarks/bench_attention.py --shapes stage1 --flex
"""
import argparse
from typing import Callable, Dict, List, Optional, Tuple

import torch

from _measure import environment, interleaved_medians, markdown_table, peak_memory_gib
from sdt.backends import spatial_decay_attention
from sdt.decay import decay_rates

# name: (batch, heads, head_dim, H, W, heads_range)
SHAPES: Dict[str, Tuple[int, int, int, int, int, float]] = {
    "stage1": (8, 4, 16, 56, 56, 4),
    "stage2": (8, 4, 32, 28, 28, 4),
    "stage3": (8, 8, 32, 14, 14, 6),
    "stage4": (8, 16, 32, 7, 7, 6),
    "dit": (32, 6, 64, 16, 16, 4),
    # sdt_h_nano / rmt_nano on 28x28 Fashion-MNIST at the recipe's batch 128 (stage 4 is 2x2)
    "nano1": (128, 2, 16, 14, 14, 4),
    "nano2": (128, 4, 16, 7, 7, 4),
    "nano3": (128, 8, 16, 4, 4, 6),
}


def make_inputs(batch: int, heads: int, dim: int, height: int, width: int, heads_range: float, device: str):
    """q, k, v (B, n, L, d), fixed rates (1, n, 1) and CAG-like rates (B, n, L) <= 0."""
    tokens = height * width
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=generator).to(device) for _ in range(3))
    fixed = decay_rates(heads, 2.0, heads_range).view(1, heads, 1).to(device)
    # CAG at init is exactly the fixed rates; a trained gate varies them per token.
    cag = fixed * (0.5 + torch.rand(batch, heads, tokens, generator=generator).to(device))
    return q, k, v, fixed, cag


def layer_cases(q, k, v, fixed, cag, grid, flex: bool, reference_full: bool) -> Dict[str, Tuple[Optional[torch.Tensor], str, str]]:
    """case name -> (rates, layout, backend)."""
    cases = {"sdpa (no decay)": (None, "full", "reference")}
    for decay, rates in (("fixed", fixed), ("cag", cag)):
        backends = ((["reference"] if reference_full else []) + ["chunked", "fused", "triton"]
                    + (["flex"] if flex else []))
        for backend in backends:
            cases[f"{decay} full / {backend}"] = (rates, "full", backend)
        cases[f"{decay} decomposed / reference"] = (rates, "decomposed", "reference")
        cases[f"{decay} decomposed / fused"] = (rates, "decomposed", "fused")
        cases[f"{decay} decomposed / triton"] = (rates, "decomposed", "triton")
        if decay == "cag":
            cases[f"{decay} decomposed / chunked"] = (rates, "decomposed", "chunked")
    return cases


def runner(q, k, v, rates, grid, layout, backend, train: bool) -> Callable[[], None]:
    def forward():
        with torch.no_grad():
            spatial_decay_attention(q, k, v, rates, grid, layout, "manhattan", backend)

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        r = None if rates is None else rates.detach().requires_grad_(rates.shape[-1] > 1)  # CAG rates are learned
        out = spatial_decay_attention(*leaves, r, grid, layout, "manhattan", backend)
        out.backward(torch.ones_like(out))

    return forward_backward if train else forward


def bench_shape(name: str, rounds: int, flex: bool, reference_full: bool, device: str) -> str:
    batch, heads, dim, height, width, heads_range = SHAPES[name]
    grid = (height, width)
    q, k, v, fixed, cag = make_inputs(batch, heads, dim, height, width, heads_range, device)
    cases = layer_cases(q, k, v, fixed, cag, grid, flex, reference_full)
    results: Dict[str, Dict[str, float]] = {}
    for train in (False, True):
        runnable = {case: runner(q, k, v, spec[0], grid, spec[1], spec[2], train=train) for case, spec in cases.items()
                    if not (spec[2] == "fused" and device != "cpu")
                    and not (spec[2] == "triton" and device != "cuda")
                    and not (train and spec[2] == "flex" and device == "cpu")}
        times = interleaved_medians(runnable, rounds, device=device)
        for case, fn in runnable.items():
            results.setdefault(case, {})[("train" if train else "infer") + "_s"] = times[case]
            results[case][("train" if train else "infer") + "_gib"] = peak_memory_gib(fn, device)
    base = results["sdpa (no decay)"]
    rows: List[List[str]] = []
    for case, r in results.items():
        row = [case]
        for mode in ("infer", "train"):
            if f"{mode}_s" in r:
                row += [f"{r[f'{mode}_s'] * 1e3:.0f}", f"{r[f'{mode}_s'] / base[f'{mode}_s']:.2f}", f"{r[f'{mode}_gib']:.3f}"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    title = f"### {name}: batch {batch}, {heads} heads, head dim {dim}, {height}x{width} grid (L={height * width})"
    header = ["case", "fwd ms", "fwd x sdpa", "fwd peak GiB", "fwd+bwd ms", "fwd+bwd x sdpa", "fwd+bwd peak GiB"]
    return title + "\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if not s.startswith("nano")],
                        choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flex", action="store_true", help="also time the compiled FlexAttention backend "
                        "(forward only on CPU; compiles once per shape, about a minute on 2 cores)")
    parser.add_argument("--no-reference-full", dest="reference_full", action="store_false",
                        help="skip the materialised full-2D reference (minutes and GBs at stage 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment())
    for name in args.shapes:
        print()
        print(bench_shape(name, args.rounds, args.flex, args.reference_full, args.device), flush=True)


if __name__ == "__main__":
    main()
