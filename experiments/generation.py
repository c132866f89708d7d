"""DiT with no decay, fixed (RMT) and CAG (SDT) attention on Fashion-MNIST: train, sample, score.

    python -m experiments.generation --jobs 3                 # train (resumable), sample, FID, report
    python -m experiments.generation --until 21:20            # start no training or sampling after 21:20 (local)
    python -m experiments.generation --report-only            # rebuild the table from finished runs
    python -m experiments.generation --extractor sdt_h_nano.fmnist   # score (or rescore) with this FID extractor

Each kind is a decay variant of ``sdt.decay.DECAY_VARIANTS`` (default none, fixed, cag), trained by
``sdt gen-train --recipe gen-fashion-mnist -o model.decay=<kind>`` with the same seed, data order and
steps, in ``<out>/<kind>`` (a "none" run trained before DiT took that name lies in ``<out>/vanilla``
and is used from there); a rerun skips finished runs and resumes unfinished ones, so
the study can be spread over several sessions. Then, per run, ``--per-class`` samples of every class
with the final EMA weights and the recipe's sampler (``<out>/<kind>/samples-<N>.npz``, the same seed
for every kind), and against the Fashion-MNIST test set (10k images): the in-domain FID
(pre-logit features of ``--extractor``, default the shipped ``sdt.fid.DEFAULT_EXTRACTOR``) and the
conditional accuracy (that classifier's agreement with the conditioning labels); the same two scores
for 10k real training images (the floor at this sample count). Scores and tables carry the
extractor's tag in their names (``<out>/<kind>/scores-<N>-<tag>.json``, ``<out>/results-<tag>.json``
and ``.md``), so rescoring the same samples with another extractor (``--extractor <tag>``) adds a
table beside the first instead of replacing it. Each run folder keeps its ``samples.png`` grid, and
``<out>/samples.png`` shows the kinds side by side.
Training throughput is not in the table (the runs share the cores): ``benchmarks/dit_throughput.py``
measures it.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from sdt.decay import DECAY_ALIASES, DECAY_VARIANTS
from sdt.tools.fid import DEFAULT_EXTRACTOR

from .runner import deadline, run_or_resume

if TYPE_CHECKING:
    import torch

KINDS = ("none", "fixed", "cag")


def run_folder(out: Path, kind: str) -> Path:
    """``<out>/<kind>``, or the folder of an older name of that variant (``DECAY_ALIASES``) if only that exists."""
    folder = out / kind
    if not folder.exists():
        for old in (alias for alias, name in DECAY_ALIASES.items() if name == kind):
            if (out / old).exists():
                return out / old
    return folder


def gen_train(out: Path, kind: str, extra: List[str], threads: int, until: Optional[float]) -> None:
    run_or_resume(run_folder(out, kind), ["-o", f"model.decay={kind}", *extra], command="gen-train", threads=threads,
                  until=until)


def run_settings(folder: Path) -> Dict[str, str]:
    """The DiT config and the sampling settings (sampler, steps, guidance) that a run's samples use."""
    import yaml

    from sdt.tasks.diffusion import SAMPLERS

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    sampler = cfg["sample"]["sampler"] or SAMPLERS[cfg["model"]["objective"]][0]
    return {"model": cfg["model"]["name"],
            "sampling": f"{sampler} {cfg['sample']['steps']} steps, cfg {cfg['sample']['cfg_scale']}"}


def sample(out: Path, kind: str, per_class: int, threads: int) -> Path:
    prefix = run_folder(out, kind) / f"samples-{per_class * 10}"
    if not prefix.with_suffix(".npz").is_file():
        subprocess.run([sys.executable, "-m", "sdt.cli", "sample", str(run_folder(out, kind)), "--output", str(prefix),
                        "--per-class", str(per_class), "--seed", "0", "--threads", str(threads)], check=True)
    return prefix.with_suffix(".npz")


def check_extractor(tag: str) -> None:
    """Exit with the library's message (unknown name, no local weights) before any training or sampling."""
    from sdt.errors import SdtError
    from sdt.tools.fid import in_domain_extractor

    try:
        in_domain_extractor(tag)
    except SdtError as error:
        raise SystemExit(f"--extractor {tag!r}: {error}") from None


def score(images: "torch.Tensor", labels: "torch.Tensor", threads: int, extractor_tag: str) -> Dict[str, float]:
    """In-domain FID against the 10k test images and conditional accuracy of uint8 (N, 1, 28, 28) images,
    with the pretrained tag ``extractor_tag`` (local weights) as feature extractor and classifier.

    ``fid_halves``: the FID of each half of the images (every class split in two), a measure of how
    much FID moves with the draw of samples alone (at half the sample count, so it is biased upwards)."""
    import torch

    from sdt.data import fashion_mnist_tensors
    from sdt.tools.fid import compute_fids, conditional_accuracy, in_domain_extractor

    torch.set_num_threads(threads)
    real, _ = fashion_mnist_tensors("test")
    extractor = in_domain_extractor(extractor_tag)
    halves = [[], []]
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        halves[0].append(members[: len(members) // 2])
        halves[1].append(members[len(members) // 2:])
    fid, *fid_halves = compute_fids([images] + [images[torch.cat(half)] for half in halves], real,
                                    "Fashion-MNIST test", extractor, extractor_tag)
    return {"fid": fid.fid, "fid_text": str(fid), "fid_halves": [half.fid for half in fid_halves],
            "conditional_accuracy": conditional_accuracy(extractor, images, labels), "extractor": extractor_tag}


def score_samples(npz: Path, threads: int, extractor_tag: str) -> Dict[str, float]:
    import numpy as np
    import torch

    with np.load(npz) as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data["labels"]).long()
    return score(images, labels, threads, extractor_tag)


def score_real(per_class: int, threads: int, extractor_tag: str) -> Dict[str, float]:
    """The same scores for real images: the first ``per_class`` training images of each class. The floor
    that a perfect generator would reach with this sample count (training and test images are different
    draws from the same distribution), and the classifier's own accuracy on real images."""
    import torch

    from sdt.data import fashion_mnist_tensors

    images, labels = fashion_mnist_tensors("train")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    return score(images[keep], labels[keep], threads, extractor_tag)


def report(out: Path, rows: List[Dict], real: Dict[str, float], extractor_tag: str) -> str:
    (out / f"results-{extractor_tag}.json").write_text(json.dumps({"extractor": extractor_tag, "runs": rows, "real": real},
                                                                  indent=2))
    lines = ["| attn | model | params | steps | sampling | final val loss (EMA) | FID (in-domain, 10k test) | "
             "FID of each half | conditional accuracy |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]

    def halves(r: Dict) -> str:
        return " / ".join(f"{h:.2f}" for h in r["fid_halves"]) if "fid_halves" in r else ""

    for r in rows:
        lines.append(f"| `{r['attn']}` | {r['model']} | {r['params']:,} | {r['steps']:,} | {r['sampling']} | "
                     f"{r['val_loss_ema']:.4f} | {r['fid']:.2f} | {halves(r)} | {100 * r['conditional_accuracy']:.1f}% |")
    lines.append(f"| real training images | | | | | | {real['fid']:.2f} | {halves(real)} | "
                 f"{100 * real['conditional_accuracy']:.1f}% |")
    lines += ["", f"{(rows[0] if rows else real)['fid_text']}."]
    text = "\n".join(lines) + "\n"
    (out / f"results-{extractor_tag}.md").write_text(text)
    return text


def sample_figure(out: Path, kinds: List[str], per_class: int) -> Optional[Path]:
    """The kinds' sample grids (first 10 of each class, a row per class) side by side: ``<out>/samples.png``;
    None while no kind has been sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = [(kind, run_folder(out, kind) / f"samples-{per_class * 10}.png") for kind in kinds]
    grids = [(kind, path) for kind, path in grids if path.is_file()]
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.5), squeeze=False)
    for ax, (kind, path) in zip(axes[0], grids):
        ax.imshow(Image.open(path), cmap="gray", vmin=0, vmax=255)
        ax.set_title(kind)
        ax.axis("off")
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/gen-runs")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(DECAY_VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads per run: cores / jobs)")
    parser.add_argument("--per-class", type=int, default=1000, help="samples per class for FID (default 1000: 10k)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--extractor", default=DEFAULT_EXTRACTOR, metavar="TAG",
                        help=f"FID extractor and classifier, a pretrained tag with local weights (default {DEFAULT_EXTRACTOR})")
    parser.add_argument("--until", metavar="HH:MM", help="start no training run or sampling after this local time (continue later)")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra gen-train overrides")
    args = parser.parse_args()
    out = Path(args.out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    until = deadline(args.until) if args.until else None
    check_extractor(args.extractor)
    if not args.report_only:
        extra = [a for o in args.override for a in ("-o", o)]
        if not any(o.startswith("engine.threads=") for o in args.override):
            extra += ["-o", f"engine.threads={threads}"]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda kind: gen_train(out, kind, extra, threads, until), args.kinds))
    rows = []
    for kind in args.kinds:
        folder = run_folder(out, kind)
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        scores_path = folder / f"scores-{args.per_class * 10}-{args.extractor}.json"
        if not scores_path.is_file():
            if args.report_only:
                continue
            if until is not None and time.time() > until:
                print(f"[later] {folder}: sampling past --until, left for the next sitting")
                continue
            npz = sample(out, kind, args.per_class, os.cpu_count() or 1)
            scores_path.write_text(json.dumps(score_samples(npz, os.cpu_count() or 1, args.extractor)))
        rows.append({"attn": kind, **run_settings(folder), "params": summary["params"],
                     "steps": summary["global_step"],
                     "val_loss_ema": summary["final_val"].get("ema_loss", summary["final_val"]["loss"]),
                     **json.loads(scores_path.read_text())})
    real_path = out / f"scores-real-{args.per_class * 10}-{args.extractor}.json"
    if not real_path.is_file():
        real_path.write_text(json.dumps(score_real(args.per_class, os.cpu_count() or 1, args.extractor)))
    print(report(out, rows, json.loads(real_path.read_text()), args.extractor))
    figure = sample_figure(out, args.kinds, args.per_class)
    print(f"sample grids: {figure}" if figure else "no kind sampled yet: no sample grids")


if __name__ == "__main__":
    main()
