"""Equal-budget dense comparison on the Fashion-MNIST mosaics: sdt_h_nano vs rmt_nano vs torchvision's
ResNet-18 FPN, detection (Faster R-CNN, box mAP) and segmentation (Semantic FPN, mIoU), several seeds.

    python -m experiments.dense_study --plan                       # measure images/s, print the CPU-hours plan
    python -m experiments.dense_study --epochs 2 --train-images 4000 --seeds 3 --jobs 2   # train + report (the defaults)
    python -m experiments.dense_study --until 07:50                # start no run after 07:50 (local time)
    python -m experiments.dense_study --report-only                # rebuild the tables from finished runs
    python -m experiments.dense_study --smoke                      # the whole pipeline on a tiny grid (minutes)

Equal budget means the same recipe, data, number of training images (epochs x train_images) and
schedule for every backbone; wall time is reported beside it, not equalised. Each run is
``python -m sdt.cli detect|segment --recipe detect-mosaic|segment-mosaic`` with
``model.backbone``, ``engine.seed``, ``engine.epochs`` and ``data.train_images`` set, in
``<out>/<task>-n<train_images>-e<epochs>/<backbone>-s<seed>`` (the budget is in the path, so grids of
different budgets never mix). A rerun skips finished runs (``summary.json``) and resumes the others from
their last checkpoint, so the grid can be stopped and continued; the default ``--out`` is tracked by git
without checkpoints and weights (experiments/results/.gitignore), so one sitting's finished runs are
committed and the next sitting continues the grid. ``--jobs N`` trains N runs at once with
(cores / N) threads each. The report (``results.json``, ``results.md``, ``samples-<task>-<backbone>.png``)
aggregates the finished runs: mean and standard deviation over seeds, and for each baseline the paired
difference to sdt_h_nano (the same seed: the same data order and mosaics) with a paired t-test.

``--plan`` times a few training steps and one evaluation pass of every (task, backbone) at the recipes'
settings and prints the hours each grid would take, and the largest number of epochs that fits
``--budget-hours`` (3 by default). Timings are only as good as the machine is idle: the load average is printed.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

from .runner import deadline, run_or_resume

BACKBONES = ("sdt_h_nano", "rmt_nano", "tv_resnet18")
TASKS = {"detect": ("detect-mosaic", "map", "box mAP@[.5:.95]"), "segment": ("segment-mosaic", "miou", "mIoU")}
REFERENCE = "sdt_h_nano"


def backbone_overrides(backbone: str) -> List[str]:
    overrides = [f"model.backbone={backbone}"]
    if backbone.startswith("tv_"):
        overrides.append("model.kwargs={}")  # the recipes' stem_stride is a timm argument
    return overrides


def grid_dir(out: Path, task: str, train_images: int, epochs: int) -> Path:
    return out / f"{task}-n{train_images}-e{epochs}"


def run_dir(out: Path, task: str, backbone: str, seed: int, train_images: int, epochs: int) -> Path:
    return grid_dir(out, task, train_images, epochs) / f"{backbone}-s{seed}"


def train_one(out: Path, task: str, backbone: str, seed: int, train_images: int, epochs: int, threads: int,
              extra: List[str], until: Optional[float] = None) -> Optional[str]:
    """Run (or resume) one cell of the grid in its own process; the error text when it failed."""
    folder = run_dir(out, task, backbone, seed, train_images, epochs)
    overrides = backbone_overrides(backbone) + [f"engine.seed={seed}", f"engine.epochs={epochs}",
                                                f"data.train_images={train_images}", f"engine.threads={threads}",
                                                "data.workers=0"] + extra
    try:
        run_or_resume(folder, ["--recipe", TASKS[task][0], *(a for o in overrides for a in ("-o", o))],
                      command=task, threads=threads, until=until)
    except subprocess.CalledProcessError as error:
        return f"{folder}: exit status {error.returncode}, see {folder.parent / (folder.name + '.log')}"
    return None


# ---------------------------------------------------------------------------------------------
# Report


def _paired(reference: Dict[int, float], other: Dict[int, float]) -> Dict[str, Any]:
    seeds = sorted(set(reference) & set(other))
    diffs = [other[s] - reference[s] for s in seeds]
    result: Dict[str, Any] = {"seeds": seeds, "mean_diff": statistics.mean(diffs) if diffs else None}
    if len(diffs) >= 2:
        from scipy import stats

        sd = statistics.stdev(diffs)
        t = stats.t.ppf(0.975, len(diffs) - 1)
        result.update(sd_diff=sd, ci95=[result["mean_diff"] - t * sd / math.sqrt(len(diffs)),
                                        result["mean_diff"] + t * sd / math.sqrt(len(diffs))],
                      p_value=float(stats.ttest_rel([other[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
                      if sd > 0 else None)
    return result


def report(out: Path) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    lines = ["# Dense study: Fashion-MNIST mosaics (not COCO)", ""]
    for grid in sorted(p for p in out.glob("*-n*-e*") if p.is_dir()):
        task = grid.name.split("-")[0]
        if task not in TASKS:
            continue
        _, metric, label = TASKS[task]
        cells: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for summary_path in sorted(grid.glob("*/summary.json")):
            backbone, _, seed = summary_path.parent.name.rpartition("-s")
            s = json.loads(summary_path.read_text())
            cells.setdefault(backbone, {})[int(seed)] = {
                "test": s["test"][metric], "best_val": s["best"]["value"], "params": s["params"],
                "train_images_per_s": s["train_images_per_s"], "wall_seconds": s["wall_seconds"]}
            if int(seed) == min(int(p.parent.name.rpartition("-s")[2]) for p in grid.glob(f"{backbone}-s*/summary.json")):
                samples = summary_path.parent / "samples.png"
                if samples.is_file():
                    shutil.copyfile(samples, out / f"samples-{task}-{backbone}.png")
        if not cells:
            continue
        rows = []
        entry: Dict[str, Any] = {}
        for backbone in [b for b in BACKBONES if b in cells] + sorted(set(cells) - set(BACKBONES)):
            runs = cells[backbone]
            values = [r["test"] for r in runs.values()]
            entry[backbone] = {"seeds": sorted(runs), "test": values, "mean": statistics.mean(values),
                               "sd": statistics.stdev(values) if len(values) > 1 else None,
                               "params": next(iter(runs.values()))["params"],
                               "train_images_per_s": statistics.mean(r["train_images_per_s"] for r in runs.values()),
                               "wall_hours": sum(r["wall_seconds"] for r in runs.values()) / 3600}
            if backbone != REFERENCE and REFERENCE in cells:
                entry[backbone]["vs_" + REFERENCE] = _paired({k: v["test"] for k, v in cells[REFERENCE].items()},
                                                             {k: v["test"] for k, v in runs.items()})
            e = entry[backbone]
            paired = e.get("vs_" + REFERENCE)
            diff = "" if paired is None or paired["mean_diff"] is None else f"{paired['mean_diff']:+.2f}"
            if paired and paired.get("ci95"):
                diff += f" [{paired['ci95'][0]:+.2f}, {paired['ci95'][1]:+.2f}]"
                diff += f", p={paired['p_value']:.3f}" if paired.get("p_value") is not None else ""
            spread = "" if e["sd"] is None else f" ± {e['sd']:.2f}"
            rows.append(f"| {backbone} | {e['params'] / 1e6:.2f} | {len(e['seeds'])} | {e['mean']:.2f}{spread} | {diff} | "
                        f"{e['train_images_per_s']:.1f} | {e['wall_hours']:.2f} |")
        results[grid.name] = entry
        lines += [f"## {grid.name}: test {label}", "",
                  f"| backbone | params (M) | seeds | test {label} (mean ± sd) | minus {REFERENCE}, paired [95% CI], p "
                  f"| train img/s | CPU wall hours (all seeds) |", "|---|---:|---:|---:|---:|---:|---:|", *rows, ""]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


# ---------------------------------------------------------------------------------------------
# Plan


def measure(task: str, backbone: str, threads: int, steps: int) -> Dict[str, float]:
    """Training and evaluation images/s of one (task, backbone) at the recipe's settings (real mosaics)."""
    import torch

    from sdt.engine import load_config
    from sdt.data import Batch
    from sdt.tasks.detect import Detect, DetectConfig, build_detector
    from sdt.tasks.segment import Segment, SegmentConfig, build_segmenter
    from sdt.engine import DistInfo, eval_loader
    from sdt.data.mosaic import FashionMosaics

    torch.set_num_threads(threads)
    config_class = DetectConfig if task == "detect" else SegmentConfig
    cfg = load_config(config_class, TASKS[task][0], backbone_overrides(backbone))
    train = FashionMosaics(cfg.data, "train")
    if task == "detect":
        model = build_detector(cfg.model, cfg.data.canvas)
        job: Any = Detect(train, train.num_classes, masks=cfg.model.detector == "maskrcnn")
    else:
        model = build_segmenter(cfg.model)
        job = Segment(train, train.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch_size = cfg.engine.batch_size
    model.train()
    seconds = []
    for step in range(steps + 1):  # the first step warms up (kernel build, allocator)
        indices = torch.arange(step * batch_size, (step + 1) * batch_size)
        batch = Batch(torch.stack([train[int(i)][0] for i in indices]), indices, 0)
        start = time.perf_counter()
        optimizer.zero_grad()
        job.loss(model, batch).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    val = FashionMosaics(dataclasses.replace(cfg.data, val_images=min(2 * batch_size, cfg.data.val_images)), "val")
    loader = eval_loader(val, batch_size, 0, DistInfo())
    start = time.perf_counter()
    job.evaluate(model, loader, DistInfo())
    eval_ips = len(val) / (time.perf_counter() - start)
    return {"train_images_per_s": batch_size / statistics.median(seconds[1:]), "eval_images_per_s": eval_ips,
            "train_images": cfg.data.train_images, "val_images": cfg.data.val_images, "test_images": cfg.data.test_images}


def plan(args: argparse.Namespace) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.jobs} job(s) x {threads} thread(s); "
          f"timings are indicative unless the machine is otherwise idle")
    rates = {}
    for task in TASKS:
        for backbone in BACKBONES:
            rates[(task, backbone)] = r = measure(task, backbone, threads, args.plan_steps)
            print(f"  {task:8s} {backbone:12s} train {r['train_images_per_s']:6.2f} img/s, eval {r['eval_images_per_s']:6.2f} img/s",
                  flush=True)
    train_images = args.train_images or next(iter(rates.values()))["train_images"]

    def hours(epochs: int, seeds: int) -> float:
        total = 0.0
        for r in rates.values():
            per_epoch = train_images / r["train_images_per_s"] + r["val_images"] / r["eval_images_per_s"]
            total += seeds * (epochs * per_epoch + r["test_images"] / r["eval_images_per_s"])
        return total / args.jobs / 3600

    print(f"\nCPU hours for the grid ({len(BACKBONES)} backbones x {len(TASKS)} tasks x seeds, {train_images} training "
          f"mosaics, {args.jobs} job(s) at once):")
    print("| epochs | " + " | ".join(f"{s} seeds" for s in (2, 3, 5)) + " |\n|---:|" + "---:|" * 3)
    for epochs in (1, 2, 3, 4, 6, 8, 12):
        print(f"| {epochs} | " + " | ".join(f"{hours(epochs, s):.2f}" for s in (2, 3, 5)) + " |")
    fitting = [e for e in range(1, 50) if hours(e, args.seeds) <= args.budget_hours]
    if fitting:
        epochs = fitting[-1]
        print(f"\nlargest budget within {args.budget_hours} h with {args.seeds} seeds: {epochs} epoch(s) of {train_images} "
              f"mosaics ({hours(epochs, args.seeds):.2f} h). Command:\n  python -m experiments.dense_study --seeds {args.seeds} "
              f"--epochs {epochs} --train-images {train_images} --jobs {args.jobs}")
    else:
        per_image = hours(1, args.seeds) / train_images
        fit = int(args.budget_hours / per_image) if per_image > 0 else 0
        print(f"\none epoch of {train_images} mosaics with {args.seeds} seeds takes {hours(1, args.seeds):.2f} h, more than "
              f"{args.budget_hours} h: about {fit} training mosaics fit (--train-images {max(fit, 1)} --epochs 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="default experiments/results/dense_study (tracked without weights); --smoke: runs/dense-study-smoke")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run (they must be the same for all backbones)")
    parser.add_argument("--plan", action="store_true", help="measure images/s and print the CPU-hours plan; trains nothing")
    parser.add_argument("--plan-steps", type=int, default=3)
    parser.add_argument("--budget-hours", type=float, default=3.0)
    parser.add_argument("--until", help="HH:MM (local time): start no new run after it, so a sitting ends cleanly")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny grid (canvas 64, 16 mosaics, 1 epoch, 2 seeds) into <out>-smoke: checks the pipeline")
    args = parser.parse_args()
    if args.plan:
        plan(args)
        return
    if args.smoke:
        args.out = args.out or Path("runs/dense-study-smoke")
        args.seeds, args.epochs, args.train_images = 2, 1, 16
        args.override += ["data.canvas=64", "data.min_side=16", "data.max_side=32", "data.val_images=8",
                          "data.test_images=8", "engine.batch_size=8", "engine.ckpt_every_steps=1", "engine.log_every_steps=1"]
    args.out = args.out or Path("experiments/results/dense_study")
    until = deadline(args.until) if args.until else None
    if not args.report_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        # seed-major: a grid stopped early (--until) has the same seeds in every (task, backbone) cell
        cells = [(t, b, s) for s in range(args.seeds) for t in args.tasks for b in args.backbones]
        with ThreadPoolExecutor(args.jobs) as pool:
            errors = [e for e in pool.map(lambda c: train_one(args.out, c[0], c[1], c[2], args.train_images, args.epochs,
                                                              threads, args.override, until), cells) if e]
        for error in errors:
            print(f"[failed] {error}", file=sys.stderr)
    report(args.out)


if __name__ == "__main__":
    main()
