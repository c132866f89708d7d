"""The SDT decay ablation on Fashion-MNIST: every decay variant, several seeds, one budget.

    python -m experiments.ablation --regime low --seeds 3 --epochs 15 --jobs 2   # train (resumable) + report
    python -m experiments.ablation --report-only                                 # just rebuild the tables

Each run is ``sdt train --recipe ablation`` with ``model.kwargs.decay=<variant>``,
``engine.seed=<seed>`` and ``engine.epochs=<epochs>`` in ``<out>/<regime>-e<epochs>/<variant>-s<seed>``
(the budget is part of the path, so grids of different budgets never mix). A rerun skips runs
that have a ``summary.json`` and resumes the others from their last checkpoint, so the grid can be
spread over several sessions. ``--jobs N`` trains N runs at once with (cores / N) threads each:
on 2 cores two 1-thread runs give about 1.2x the images/s of one 2-thread run. The report
(``results.json``, ``results.csv``, ``results.md``, ``accuracy.png``) aggregates whatever runs are
finished, one table per regime and budget.
"""
import argparse
import csv
import json
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

from .runner import mean_std, run_or_resume, t_quantile_975

VARIANTS = ("none", "fixed", "learned", "content", "cag")
DESCRIPTIONS = {
    "none": "no decay (rotary + LCE only)",
    "fixed": "RMT fixed decay",
    "learned": "learned per-head decay, no content gate",
    "content": "content gate, no distance term",
    "cag": "SDT: content gate x distance",
}
REGIMES = {  # training images drawn from the 55k left after the 5k validation split
    "full": 55000,
    "low": 6000,
}


def run_dir(out: Path, regime: str, variant: str, seed: int, epochs: int) -> Path:
    return out / f"{regime}-e{epochs}" / f"{variant}-s{seed}"


def train(out: Path, regime: str, variant: str, seed: int, epochs: int, extra: List[str]) -> None:
    run_or_resume(run_dir(out, regime, variant, seed, epochs),
                  ["--recipe", "ablation", "-o", f"model.kwargs.decay={variant}", "-o", f"engine.seed={seed}",
                   "-o", f"data.train_subset={REGIMES[regime]}", "-o", f"engine.epochs={epochs}", *extra])


def collect(out: Path) -> List[Dict]:
    rows = []
    for summary_path in sorted(out.glob("*-e*/*/summary.json")):
        regime, epochs = summary_path.parent.parent.name.rsplit("-e", 1)
        variant, seed = summary_path.parent.name.rsplit("-s", 1)
        s = json.loads(summary_path.read_text())
        rows.append(dict(regime=regime, epochs=int(epochs), steps=s["global_step"], variant=variant, seed=int(seed),
                         test_top1=s["test"]["top1"],
                         val_top1=s["best"]["value"], params=s["params"],
                         train_images_per_s=s.get("train_images_per_s"), wall_seconds=s["wall_seconds"]))
    return rows


def report(out: Path) -> str:
    rows = collect(out)
    if not rows:
        return "no finished runs yet"
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for regime, epochs in budgets(rows):
        group = [x for x in rows if (x["regime"], x["epochs"]) == (regime, epochs)]
        lines += [f"### Regime `{regime}`: {REGIMES[regime]:,} training images, {epochs} epochs ({group[0]['steps']:,} steps)", "",
                  "| decay | what it computes | seeds | test top-1 (%) | val top-1 (%) | params | train img/s | wall min |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for variant in VARIANTS:
            rs = [x for x in group if x["variant"] == variant]
            if not rs:
                continue
            ips = [x["train_images_per_s"] for x in rs if x["train_images_per_s"]]
            lines.append(f"| `{variant}` | {DESCRIPTIONS[variant]} | {len(rs)} | {mean_std([x['test_top1'] for x in rs])} | "
                         f"{mean_std([x['val_top1'] for x in rs])} | {rs[0]['params']:,} | "
                         f"{statistics.mean(ips):.0f} | {statistics.mean(x['wall_seconds'] for x in rs) / 60:.1f} |")
        cag = {x["seed"]: x["test_top1"] for x in group if x["variant"] == "cag"}
        fixed = {x["seed"]: x["test_top1"] for x in group if x["variant"] == "fixed"}
        paired = [cag[s] - fixed[s] for s in sorted(set(cag) & set(fixed))]
        if len(paired) >= 2:
            mean = statistics.mean(paired)
            half = t_quantile_975(len(paired) - 1) * statistics.stdev(paired) / math.sqrt(len(paired))
            lines += ["", f"Paired CAG - fixed (test top-1, same seed): differences {', '.join(f'{d:+.2f}' for d in paired)}; "
                          f"mean {mean:+.2f} points, 95% CI [{mean - half:+.2f}, {mean + half:+.2f}] (t, {len(paired) - 1} df)."]
        lines.append("")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    plot(rows, out / "accuracy.png")
    return text


def budgets(rows: List[Dict]) -> List[tuple]:
    """The (regime, epochs) pairs that have finished runs, in REGIMES order, then by epochs."""
    return sorted({(x["regime"], x["epochs"]) for x in rows}, key=lambda b: (list(REGIMES).index(b[0]), b[1]))


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = budgets(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (regime, epochs) in zip(axes[0], groups):
        group = [x for x in rows if (x["regime"], x["epochs"]) == (regime, epochs)]
        names, means, errs = [], [], []
        for variant in VARIANTS:
            acc = [x["test_top1"] for x in group if x["variant"] == variant]
            if acc:
                names.append(variant)
                means.append(statistics.mean(acc))
                errs.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        ax.bar(names, means, yerr=errs, capsize=4, color="#5b8def")
        for i, variant in enumerate(names):
            acc = [x["test_top1"] for x in group if x["variant"] == variant]
            ax.plot([i] * len(acc), acc, "k.", alpha=0.6)
        low = min(min(m - e for m, e in zip(means, errs)) - 1, 100)
        ax.set_ylim(low, min(100, max(m + e for m, e in zip(means, errs)) + 0.5))
        ax.set_ylabel("test top-1 (%)")
        ax.set_xlabel("decay variant")
        ax.set_title(f"{regime}: {REGIMES[regime]:,} images, {epochs} epochs (mean ± sd, dots = seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/runs", help="folder for the runs and the report")
    parser.add_argument("--regime", choices=sorted(REGIMES), action="append", help="default: low")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads per run: cores / jobs)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra sdt train overrides")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report_only:
        extra = [a for o in args.override for a in ("-o", o)]
        if not any(o.startswith("engine.threads=") for o in args.override):
            extra += ["-o", f"engine.threads={max(1, (os.cpu_count() or 1) // args.jobs)}"]
        # seed-major order: after any prefix of the grid every variant has the same number of seeds
        grid = [(regime, variant, seed) for regime in args.regime or ["low"]
                for seed in range(args.seeds) for variant in args.variants]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for _ in pool.map(lambda g: train(out, g[0], g[1], g[2], args.epochs, extra), grid):
                pass
    print(report(out))


if __name__ == "__main__":
    main()
