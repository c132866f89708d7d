"""Issues 18 and 33: where does data-dependent decay matter, and does it beat fixed decay once its gates
have time to learn? Decay variants in a plain ViT (sdt_vit_fm_tiny), where attention is the only spatial
mixer, on Fashion-MNIST subsets. Regimes: ``long`` (issue 33, the default: 6k images x 20 epochs =
1,860 steps; vit, fixed, cag and cag with a 10x gate lr) and issue 18's ``2k`` and ``6k``.

    python -m experiments.vit_study --plan                 # the grid and its estimated CPU hours
    python -m experiments.vit_study --smoke --out /tmp/vs  # tiny budget, end to end in minutes
    python -m experiments.vit_study --jobs 2               # the study (resumable: rerun to continue)
    python -m experiments.vit_study --jobs 2 --until 21:20 # start no run after 21:20 (local time)
    python -m experiments.vit_study --report-only          # tables + plot from the finished runs

Each run is ``sdt train --recipe ablation`` with ``model.name=sdt_vit_fm_tiny`` and the variant's
``model.kwargs`` in ``<out>/<images>k-e<epochs>/<variant>-s<seed>``. Finished runs (summary.json)
are skipped, killed ones resume from their last checkpoint (``experiments/runner.py``'s rules).
The default ``--out`` is tracked by git without checkpoints and weights (its .gitignore), so the
finished runs of one sitting are committed and the next sitting continues the grid; the gate
analysis of a run is cached in its ``gates.json`` for the same reason.
The report gives mean ± sd per variant and paired differences (same seed) with 95% t-intervals, the
validation curves, and how far the gates moved during training (the ``gate_drift`` metrics).
"""
import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .runner import deadline, mean_std, run_or_resume, t_quantile_975


MODEL = "sdt_vit_fm_tiny"
VARIANTS = {  # name -> model.kwargs
    "vit": dict(decay="none", pos_embed="learned"),   # what a user would pick instead
    "nopos": dict(decay="none", pos_embed="none"),    # the floor: no position information at all
    "fixed": dict(decay="fixed", pos_embed="none"),   # RMT's decay as the only prior
    "learned": dict(decay="learned", pos_embed="none"),
    "cag": dict(decay="cag", pos_embed="none"),       # SDT
    "cag_pos": dict(decay="cag", pos_embed="learned"),
    "cag_lr10": dict(decay="cag", pos_embed="none"),  # SDT, gate parameters at 10x the lr (ENGINE below)
}
# Engine overrides of a variant. The paper gives no gate lr: 10x shows whether the shared one under-trains the gates.
ENGINE = {"cag_lr10": ['engine.lr_scale={"*gate*": 10}']}
NOTES = {"cag_lr10": "; gate lr x10"}
COMPARISONS = (("fixed", "nopos"), ("cag", "fixed"), ("cag", "vit"), ("fixed", "vit"), ("learned", "fixed"), ("cag_pos", "vit"),
               ("cag_pos", "cag"), ("cag_lr10", "cag"), ("cag_lr10", "fixed"))
FIRST_SIX = ("vit", "nopos", "fixed", "learned", "cag", "cag_pos")


@dataclass(frozen=True)
class Regime:
    """One budget of the study: its training images and epochs (1 epoch = images // 64 optimizer steps),
    its variants in grid order, and which of them get ``--seeds`` seeds (the rest ``--extra-seeds``)."""
    images: int
    epochs: int
    variants: Tuple[str, ...]
    central: Tuple[str, ...]
    seeds: int
    extra_seeds: int

    @property
    def folder(self) -> str:
        return f"{self.images // 1000}k-e{self.epochs}"


REGIMES = {
    # issue 18: 620 / 651 steps, about the same images seen (40k, 42k); sized for ~4 h wall with --jobs 2
    "2k": Regime(2000, 20, FIRST_SIX, ("vit", "nopos", "fixed", "cag"), 5, 3),
    "6k": Regime(6000, 7, FIRST_SIX, ("vit", "nopos", "fixed", "cag"), 5, 3),  # superseded by "long" (docs/vit_study.md)
    # issue 33: 3x the steps (1,860), so the gates have time to move; the variants a user chooses between
    "long": Regime(6000, 20, ("vit", "fixed", "cag", "cag_lr10"), ("vit", "fixed", "cag"), 3, 3),
}


def run_dir(out: Path, regime: str, variant: str, seed: int) -> Path:
    return out / REGIMES[regime].folder / f"{variant}-s{seed}"


def grid(regimes: List[str], seeds: Optional[int] = None, extra_seeds: Optional[int] = None) -> List[tuple]:
    """Seed-major: after any prefix every variant has about the same number of seeds."""
    out = []
    for name in regimes:
        regime = REGIMES[name]
        central, extra = seeds or regime.seeds, extra_seeds if extra_seeds is not None else regime.extra_seeds
        for seed in range(max(central, extra)):
            for variant in regime.variants:
                if seed < (central if variant in regime.central else extra):
                    out.append((name, variant, seed))
    return out


def train(out: Path, regime: str, variant: str, seed: int, extra: List[str], until: Optional[float] = None) -> None:
    kw = [a for k, v in VARIANTS[variant].items() for a in ("-o", f"model.kwargs.{k}={v}")]
    kw += [a for o in ENGINE.get(variant, []) for a in ("-o", o)]
    r = REGIMES[regime]
    run_or_resume(run_dir(out, regime, variant, seed),
                  ["--recipe", "ablation", "-o", f"model.name={MODEL}", *kw, "-o", f"engine.seed={seed}",
                   "-o", f"data.train_subset={r.images}", "-o", f"engine.epochs={r.epochs}", *extra], until=until)


def measure_throughput(batch: int = 64, steps: int = 4) -> Dict[str, float]:
    """Training img/s (1 thread) of each distinct model.kwargs from a few fwd+bwd steps."""
    import timm
    import torch

    import sdt  # noqa: F401
    torch.set_num_threads(1)
    rates: Dict[str, float] = {}
    for name, kwargs in VARIANTS.items():
        same = next((n for n in rates if VARIANTS[n] == kwargs), None)
        if same is not None:  # the lr does not change the cost of a step
            rates[name] = rates[same]
            continue
        model = timm.create_model(MODEL, **kwargs).train()
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        torch.nn.functional.cross_entropy(model(x), y).backward()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        rates[name] = batch * steps / (time.perf_counter() - start)
    return rates


def plan(args: argparse.Namespace) -> None:
    rates = measure_throughput()
    runs = grid(args.regime, args.seeds, args.extra_seeds)
    cpu_s = sum(REGIMES[r].images * REGIMES[r].epochs / rates[v] for r, v, _ in runs)
    evals = sum(REGIMES[r].epochs * 2000 + 10000 for r, _, _ in runs) / (3 * statistics.mean(rates.values()))  # ~3x faster
    print("measured 1-thread training img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(f"load: {os.getloadavg()[0]:.2f}")
    for name in args.regime:
        r = REGIMES[name]
        n = [v for g, v, _ in runs if g == name]
        print(f"regime {name} ({r.folder}): {r.images} images x {r.epochs} epochs = {r.images // 64 * r.epochs} steps; "
              + ", ".join(f"{v} x{n.count(v)}" for v in r.variants))
    total = (cpu_s + evals) / 3600
    print(f"{len(runs)} runs, about {total:.1f} core-hours; with --jobs 2 on 2 cores about {total / 2 / 1.0:.1f} h wall "
          f"(training only {cpu_s / 3600:.1f} core-h; runs share the cores, so expect up to 1.4x that)")


def collect(out: Path) -> List[Dict]:
    rows = []
    for path in sorted(out.glob("*-e*/*-s*/summary.json")):
        regime, epochs = path.parent.parent.name.rsplit("-e", 1)
        variant, seed = path.parent.name.rsplit("-s", 1)
        s = json.loads(path.read_text())
        rows.append(dict(regime=regime, epochs=int(epochs), variant=variant, seed=int(seed),
                         test_top1=s["test"]["top1"], val_top1=s["best"]["value"], params=s["params"],
                         wall_seconds=s["wall_seconds"]))
    return rows


def paired(group: List[Dict], a: str, b: str) -> str:
    xa = {x["seed"]: x["test_top1"] for x in group if x["variant"] == a}
    xb = {x["seed"]: x["test_top1"] for x in group if x["variant"] == b}
    d = [xa[s] - xb[s] for s in sorted(set(xa) & set(xb))]
    if len(d) < 2:
        return f"| {a} - {b} | {len(d)} | - | - |"
    mean = statistics.mean(d)
    half = t_quantile_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return f"| {a} - {b} | {len(d)} | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}] |"


def report(out: Path) -> str:
    rows = collect(out)
    if not rows:
        return "no finished runs yet"
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = []
    groups = sorted({(x["regime"], x["epochs"]) for x in rows})
    for regime, epochs in groups:
        g = [x for x in rows if (x["regime"], x["epochs"]) == (regime, epochs)]
        lines += [f"### {MODEL}, {regime} training images, {epochs} epochs", "",
                  "| variant | model.kwargs | seeds | test top-1 (%) | val top-1 (%) | params |", "|---|---|---:|---:|---:|---:|"]
        for v, kw in VARIANTS.items():
            rs = [x for x in g if x["variant"] == v]
            if rs:
                lines.append(f"| `{v}` | {kw}{NOTES.get(v, '')} | {len(rs)} | {mean_std([x['test_top1'] for x in rs])} | "
                             f"{mean_std([x['val_top1'] for x in rs])} | {rs[0]['params']:,} |")
        lines += ["", "Paired differences (test top-1 points, same seed), 95% t-interval:", "",
                  "| comparison | pairs | mean | 95% CI |", "|---|---:|---:|---:|"]
        present = {x["variant"] for x in g}
        lines += [paired(g, a, b) for a, b in COMPARISONS if {a, b} <= present] + [""]
    for regime, epochs in groups:
        lines += curves(out / f"{regime}-e{epochs}")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    plot(rows, groups, out / "accuracy.png")
    return text


def read_curves(group_dir: Path) -> Dict[str, Dict[int, List[Dict]]]:
    """variant -> seed -> the validation rows of its metrics.jsonl (step, top1, gate_drift...), finished runs only."""
    from sdt.engine.log import read_metrics

    out: Dict[str, Dict[int, List[Dict]]] = {}
    for summary in sorted(group_dir.glob("*-s*/summary.json")):
        variant, seed = summary.parent.name.rsplit("-s", 1)
        rows = [r for r in read_metrics(summary.parent / "metrics.jsonl") if r["kind"] == "val"]
        out.setdefault(variant, {})[int(seed)] = rows
    return out


def curves(group_dir: Path) -> List[str]:
    """Validation top-1 against step per variant (mean over seeds, thin lines = seeds) in curves.png, and
    for the gated variants the mean |s - lambda| per block against step (``sdt.attention.GateDrift``, logged
    by the classification task at every validation) in gate_drift.png, both in ``group_dir``. Returns the
    markdown lines for results.md (the drift at the end of training per block), or none when the runs
    predate the drift metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_curves(group_dir)
    if not data:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (variant, seeds) in enumerate(sorted(data.items())):
        color = f"C{i}"
        for rows in seeds.values():
            ax.plot([r["step"] for r in rows], [r["top1"] for r in rows], color=color, alpha=0.25, lw=0.8)
        steps = [r["step"] for r in next(iter(seeds.values()))]
        mean = [statistics.mean(rows[k]["top1"] for rows in seeds.values() if k < len(rows)) for k in range(len(steps))]
        ax.plot(steps, mean, color=color, lw=2, label=f"{variant} ({len(seeds)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{MODEL}, {group_dir.name}: accuracy during training", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(group_dir / "curves.png", dpi=100)
    plt.close(fig)

    gated = {v: seeds for v, seeds in data.items() if all("gate_drift" in rows[-1] for rows in seeds.values())}
    if not gated:
        return []
    blocks = sorted(int(k.split(".")[1]) for k in next(iter(next(iter(gated.values())).values()))[-1] if k.startswith("gate_drift."))
    fig, axes = plt.subplots(1, len(gated), figsize=(5.5 * len(gated), 3.8), squeeze=False, sharey=True)
    lines = ["", f"Gate movement in {group_dir.name}: mean |s - lambda_h| over validation images, heads and tokens at "
                 "the last validation (s = alpha_h G, the rate the attention uses; 0 at initialisation), mean ± sd over seeds:",
             "", "| variant | seeds | " + " | ".join(f"block {b}" for b in blocks) + " |",
             "|---|---:|" + "---:|" * len(blocks)]
    for ax, (variant, seeds) in zip(axes[0], sorted(gated.items())):
        for b in blocks:
            steps = [r["step"] for r in next(iter(seeds.values()))]
            mean = [statistics.mean(rows[k][f"gate_drift.{b}"] for rows in seeds.values() if k < len(rows)) for k in range(len(steps))]
            ax.plot(steps, mean, label=f"block {b}")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{variant}: mean |s - lambda| per block ({len(seeds)} seeds)", fontsize=9)
        ax.legend(fontsize=7)
        last = [[rows[-1][f"gate_drift.{b}"] for rows in seeds.values()] for b in blocks]
        lines.append(f"| `{variant}` | {len(seeds)} | " + " | ".join(
            f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}" for v in last) + " |")
    axes[0, 0].set_ylabel("mean |s - lambda_h|")
    fig.tight_layout()
    fig.savefig(group_dir / "gate_drift.png", dpi=100)
    plt.close(fig)
    return lines


def plot(rows: List[Dict], groups: List[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, (regime, epochs) in zip(axes[0], groups):
        names = [v for v in VARIANTS if any(x["variant"] == v and x["regime"] == regime and x["epochs"] == epochs for x in rows)]
        for i, v in enumerate(names):
            acc = [x["test_top1"] for x in rows if (x["variant"], x["regime"], x["epochs"]) == (v, regime, epochs)]
            ax.bar(i, statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1 else 0, capsize=4, color="#5b8def")
            ax.plot([i] * len(acc), acc, "k.", alpha=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{regime} images, {epochs} epochs (mean ± sd, dots = seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_gates(run: Path, images: int = 256) -> List[Dict]:
    """G = logsigmoid(x W_g + b) of one finished cag/cag_pos run on test images: per depth and head the
    mean and sd of G, RMT's fixed rate lambda_h, and the mean G on object vs background patches (a 2x2
    patch is background when all its pixels are 0 in the raw image). Cached in the run's gates.json,
    since the committed study keeps the weights of seed 0 only."""
    cache = run / "gates.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if not (run / "best.safetensors").is_file():
        print(f"[gates] {run}: no gates.json and no best.safetensors, skipped")
        return []
    import torch

    from sdt.files import load_into, load_weights
    from sdt.engine import load_config
    from sdt.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, resolve_in_chans, resolve_num_classes
    from sdt.engine import eval_loader, setup_distributed
    from sdt.tasks.classify import TrainConfig, classification_datasets, create_model

    background = (0.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0] + 1e-3
    cfg = load_config(TrainConfig, str(run / "config.yaml"))
    cfg.data.test_subset = images
    cfg.model.in_chans = resolve_in_chans(cfg.data, cfg.model.in_chans)
    test_set = classification_datasets(cfg, ["test"], cfg.model.in_chans)["test"]
    cfg.model.num_classes = resolve_num_classes(cfg.model.num_classes, test_set.classes)
    net = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans).eval()
    load_into(net, load_weights(run / "best.safetensors"), run / "best.safetensors")
    gates, masks = {}, []
    hooks = [blk.attn.gate.register_forward_hook(
        lambda m, inp, o, i=i: gates.setdefault(i, []).append(m.gate_map(inp[0])))  # noqa: B023
        for i, blk in enumerate(net.blocks)]
    with torch.no_grad():
        for batch in eval_loader(test_set, 64, 0, setup_distributed("auto")):
            masks.append((torch.nn.functional.max_pool2d(batch.images, 2) > background).flatten(1))  # (B, L) object
            net(batch.images)
    for h in hooks:
        h.remove()
    obj = torch.cat(masks)  # (N, L)
    rows = []
    for depth, maps in sorted(gates.items()):
        g = torch.cat(maps)  # (N, heads, L)
        fixed = net.blocks[depth].attn.gate.fixed_rates
        for head in range(g.shape[1]):
            gh = g[:, head]
            rows.append(dict(depth=depth, head=head, fixed=float(fixed[head]), mean=float(gh.mean()), std=float(gh.std()),
                             # spread over images of a token's G, averaged over tokens: content dependence
                             std_over_images=float(gh.std(0).mean()),
                             object=float(gh[obj].mean()), background=float(gh[~obj].mean())))
    cache.write_text(json.dumps(rows, indent=2))
    return rows


def gate_analysis(out: Path) -> str:
    """The gates of every finished cag/cag_pos run (``run_gates``): a table per run, a summary per
    variant and depth over seeds, and gates.png (mean G per head against the fixed rates, and G on
    objects vs background). Writes gates.json and gates.md in ``out``."""
    results = []
    for summary in sorted(out.glob("*-e*/cag*-s*/summary.json")):
        run = summary.parent
        variant, seed = run.name.rsplit("-s", 1)
        for row in run_gates(run):
            results.append(dict(group=run.parent.name, variant=variant, seed=int(seed), **row))
    if not results:
        return "no finished cag runs yet"
    (out / "gates.json").write_text(json.dumps(results, indent=2))
    lines = ["Per variant and depth, over heads and seeds: mean G, RMT's fixed rate, object - background G "
             "(mean over seeds of the per-run head average, with its sd), and the spread of a token's G over images.", "",
             "| group | variant | depth | seeds | mean G | fixed lambda | G object - background | sd of G over images |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["group"], r["variant"], r["depth"]) for r in results})
    for group, variant, depth in keys:
        rs = [r for r in results if (r["group"], r["variant"], r["depth"]) == (group, variant, depth)]
        seeds = sorted({r["seed"] for r in rs})
        contrast = [statistics.mean(r["object"] - r["background"] for r in rs if r["seed"] == s) for s in seeds]
        lines.append(f"| {group} | {variant} | {depth} | {len(seeds)} | {statistics.mean(r['mean'] for r in rs):.3f} | "
                     f"{statistics.mean(r['fixed'] for r in rs):.3f} | {mean_std(contrast).replace(' ', '')} | "
                     f"{statistics.mean(r['std_over_images'] for r in rs):.3f} |")
    lines += ["", "Per run, depth and head:", "",
              "| run | depth | head | fixed lambda | mean G ± sd | G object | G background |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['group']}/{r['variant']}-s{r['seed']} | {r['depth']} | {r['head']} | {r['fixed']:.3f} | "
              f"{r['mean']:.3f} ± {r['std']:.3f} | {r['object']:.3f} | {r['background']:.3f} |" for r in results]
    text = "\n".join(lines)
    (out / "gates.md").write_text(text)
    plot_gates(results, out / "gates.png")
    return text


def plot_gates(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({(r["group"], r["variant"]) for r in results})  # one column per regime and variant
    fig, axes = plt.subplots(2, len(columns), figsize=(6 * len(columns), 6.4), squeeze=False)
    for col, (group, variant) in enumerate(columns):
        rs = [r for r in results if (r["group"], r["variant"]) == (group, variant)]
        label = f"{group} {variant}"
        depths, heads = max(r["depth"] for r in rs) + 1, max(r["head"] for r in rs) + 1
        ax = axes[0, col]
        for head in range(heads):
            xs = [d + (head - heads / 2) * 0.12 for d in range(depths)]
            per = [[r["mean"] for r in rs if (r["depth"], r["head"]) == (d, head)] for d in range(depths)]
            ax.plot(xs, [statistics.mean(p) for p in per], "o", label=f"head {head}: learned G")
            ax.plot(xs, [next(r["fixed"] for r in rs if (r["depth"], r["head"]) == (d, head)) for d in range(depths)],
                    "k_", markersize=10)
        ax.set_xlabel("depth (block)")
        ax.set_ylabel("mean G over tokens and images")
        ax.set_title(f"{label}: learned G per head (dots) vs RMT's fixed rate (bars)", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, col]
        for i, key in enumerate(("object", "background")):
            ax.bar([d + (i - 0.5) * 0.38 for d in range(depths)],
                   [statistics.mean(r[key] for r in rs if r["depth"] == d) for d in range(depths)], width=0.38, label=key)
        ax.set_xlabel("depth (block)")
        ax.set_ylabel("mean G")
        ax.set_title(f"{label}: G on object vs background patches (over heads and seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/vit_study")
    parser.add_argument("--regime", choices=sorted(REGIMES), action="append",
                        help="long (default): 6k images x 20 epochs, issue 33; 2k and 6k: issue 18's")
    parser.add_argument("--seeds", type=int, help="seeds of the central variants (default: the regime's)")
    parser.add_argument("--extra-seeds", type=int, help="seeds of the other variants (default: the regime's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--plan", action="store_true", help="print the grid and its estimated cost")
    parser.add_argument("--smoke", action="store_true", help="tiny budget (1 epoch, 256 images, 1 seed)")
    parser.add_argument("--until", help="HH:MM (local time): start no new run after it, so a sitting ends cleanly")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--gates", action="store_true", help="only the gate analysis of the finished cag runs")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    args.regime = args.regime or ["long"]
    if args.smoke:
        for name, r in REGIMES.items():
            REGIMES[name] = Regime(256, 1, r.variants, r.central, 2, 1)
        args.seeds, args.extra_seeds = 2, 1
        args.override += ["data.val_subset=128", "data.test_subset=256", "engine.ckpt_every_steps=2"]
    if args.plan:
        plan(args)
        return
    out = Path(args.out)
    if args.gates:
        print(gate_analysis(out))
        return
    extra = [a for o in args.override for a in ("-o", o)]
    extra += ["-o", f"engine.threads={max(1, (os.cpu_count() or 1) // args.jobs)}"]
    until = deadline(args.until) if args.until else None
    if not args.report_only:
        runs = grid(args.regime, args.seeds, args.extra_seeds)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda g: train(out, g[0], g[1], g[2], extra, until), runs))
    print(report(out))


if __name__ == "__main__":
    main()
