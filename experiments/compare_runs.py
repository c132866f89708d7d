"""Several ``sdt train`` runs on one plot: validation top-1 and training loss per epoch.

    python -m experiments.compare_runs runs/fmnist30-sdt_h_nano runs/fmnist30-rmt_nano \
        --out docs/img/fmnist30_sdt_vs_rmt.png

Each run is labelled with its model name (``config.yaml``) and, when it has finished, its test
top-1 (``summary.json``). Solid lines are the model's weights, dashed ones the EMA weights.
"""
import argparse
import json
from pathlib import Path
from typing import List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from sdt.engine import read_metrics  # noqa: E402
from sdt.engine.plots import save_figure  # noqa: E402


def names(run: Path) -> Tuple[str, str]:
    """(model name, legend label: the name and, once the run has finished, its test top-1)."""
    name = yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]
    summary = run / "summary.json"
    if not summary.exists():
        return name, name
    return name, f"{name} (test top-1 {json.loads(summary.read_text())['test']['top1']:.2f}%)"


def plot(runs: List[Path], out: Path, first_epoch: int) -> None:
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        records = read_metrics(run / "metrics.jsonl")
        evals = [r for r in records if r["kind"] == "val" and r["epoch"] >= first_epoch]
        train = [r for r in records if r["kind"] == "train"]
        name, label = names(run)
        acc.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], "-", color=color, label=label)
        if evals and "ema_top1" in evals[0]:
            acc.plot([r["epoch"] for r in evals], [r["ema_top1"] for r in evals], "--", color=color, label=f"{name}, EMA")
        loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], color=color, alpha=0.8, label=label)
    for ax, title in ((acc, f"validation top-1 (%), from epoch {first_epoch}"), (loss, "training loss (on augmented batches)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with config.yaml and metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--first-epoch", type=int, default=1,
                        help="leave out the validation points of earlier epochs (they squash the scale)")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "metrics.jsonl").exists() or not (run / "config.yaml").exists():
            parser.error(f"{run} is not an sdt train run folder (no metrics.jsonl / config.yaml)")
    plot(args.runs, args.out, args.first_epoch)
    print(args.out)


if __name__ == "__main__":
    main()
