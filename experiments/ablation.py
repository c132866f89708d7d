"""The SDT decay ablation on Fashion-MNIST: every decay variant, several seeds, one budget.

    python experiments/ablation.py --regime low --seeds 3          # train (resumable) + report
    python experiments/ablation.py --report-only                    # just rebuild the tables

Each run is ``sdt train --recipe ablation`` with ``model.kwargs.decay=<variant>`` and
``engine.seed=<seed>`` in ``<out>/<regime>/<variant>-s<seed>``. A rerun skips runs that have a
``summary.json`` and resumes the others from their last checkpoint, so the grid can be spread
over several sessions. The report (``results.json``, ``results.csv``, ``results.md``,
``accuracy.png``) aggregates whatever runs are finished.
"""
import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

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


def run_dir(out: Path, regime: str, variant: str, seed: int) -> Path:
    return out / regime / f"{variant}-s{seed}"


def train(out: Path, regime: str, variant: str, seed: int, epochs: int, extra: List[str]) -> None:
    folder = run_dir(out, regime, variant, seed)
    if (folder / "summary.json").is_file():
        print(f"[skip] {folder} is finished")
        return
    cmd = [sys.executable, "-m", "sdt.cli", "train", "--recipe", "ablation", "--output", str(folder),
           "-o", f"model.kwargs.decay={variant}", "-o", f"engine.seed={seed}",
           "-o", f"data.train_subset={REGIMES[regime]}", "-o", f"engine.epochs={epochs}", *extra]
    if folder.exists():
        cmd += ["--resume"]
        print(f"[resume] {folder}")
    else:
        print(f"[train] {folder}")
    subprocess.run(cmd, check=True)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def collect(out: Path) -> List[Dict]:
    rows = []
    for summary_path in sorted(out.glob("*/*/summary.json")):
        regime = summary_path.parent.parent.name
        variant, seed = summary_path.parent.name.rsplit("-s", 1)
        s = json.loads(summary_path.read_text())
        rows.append(dict(regime=regime, variant=variant, seed=int(seed), test_top1=s["test"]["top1"],
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
    for regime in [r for r in REGIMES if any(x["regime"] == r for x in rows)]:
        lines += [f"### Regime `{regime}` ({REGIMES[regime]:,} training images)", "",
                  "| decay | what it computes | seeds | test top-1 (%) | val top-1 (%) | params | train img/s | wall min |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for variant in VARIANTS:
            rs = [x for x in rows if x["regime"] == regime and x["variant"] == variant]
            if not rs:
                continue
            ips = [x["train_images_per_s"] for x in rs if x["train_images_per_s"]]
            lines.append(f"| `{variant}` | {DESCRIPTIONS[variant]} | {len(rs)} | {mean_std([x['test_top1'] for x in rs])} | "
                         f"{mean_std([x['val_top1'] for x in rs])} | {rs[0]['params']:,} | "
                         f"{statistics.mean(ips):.0f} | {statistics.mean(x['wall_seconds'] for x in rs) / 60:.1f} |")
        cag = {x["seed"]: x["test_top1"] for x in rows if x["regime"] == regime and x["variant"] == "cag"}
        fixed = {x["seed"]: x["test_top1"] for x in rows if x["regime"] == regime and x["variant"] == "fixed"}
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


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if any(x["regime"] == r for x in rows)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        names, means, errs = [], [], []
        for variant in VARIANTS:
            acc = [x["test_top1"] for x in rows if x["regime"] == regime and x["variant"] == variant]
            if acc:
                names.append(variant)
                means.append(statistics.mean(acc))
                errs.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        ax.bar(names, means, yerr=errs, capsize=4, color="#5b8def")
        for i, variant in enumerate(names):
            acc = [x["test_top1"] for x in rows if x["regime"] == regime and x["variant"] == variant]
            ax.plot([i] * len(acc), acc, "k.", alpha=0.6)
        low = min(min(m - e for m, e in zip(means, errs)) - 1, 100)
        ax.set_ylim(low, min(100, max(m + e for m, e in zip(means, errs)) + 0.5))
        ax.set_ylabel("test top-1 (%)")
        ax.set_xlabel("decay variant")
        ax.set_title(f"{regime}: {REGIMES[regime]:,} train images (mean ± sd, dots = seeds)", fontsize=9)
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
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra sdt train overrides")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report_only:
        extra = [a for o in args.override for a in ("-o", o)]
        # seed-major order: after any prefix of the grid every variant has the same number of seeds
        for regime in args.regime or ["low"]:
            for seed in range(args.seeds):
                for variant in args.variants:
                    train(out, regime, variant, seed, args.epochs, extra)
    print(report(out))


if __name__ == "__main__":
    main()
