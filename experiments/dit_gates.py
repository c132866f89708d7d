"""Why is CAG worse than fixed decay in DiT? Gate statistics of the trained dit_n_2 models across noise levels.

Reads the final EMA weights of the gen_dit_n_2_rerun study (none, fixed, cag; committed), runs them on the
Fashion-MNIST test images noised to several flow times t (0 = pure noise, 1 = data), and writes to
experiments/results/dit_gates/:
- stats.json / report.md: per block, the gate's rate s = alpha * G against RMT's lambda (mean over tokens,
  samples and heads), its spread over tokens, and how much of the gate-logit variance each factor explains
  (noise level t, the sample, the token within a sample);
- velocity MSE per t for none / fixed / cag on the same (image, noise, t) triples: where cag loses;
- gates_vs_t.png: mean rate per block and head against t with lambda dashed, and the spread over tokens;
- gate_maps.png: head-averaged rate maps on a few samples at several t, beside x_t.

    python -m experiments.dit_gates [--per-class 50] [--seed 0]
    python -m experiments.dit_gates --cag experiments/results/gen_dit_n_2_gate_norm/cag \
        --out experiments/results/dit_gates_gate_norm        # another cag run beside the rerun's none and fixed
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List

import matplotlib
import numpy as np
import torch

from sdt.data.images import fashion_mnist_tensors
from sdt.tasks.generate import images_to_model, load_generator

STUDY = Path(__file__).parent / "results" / "gen_dit_n_2_rerun"
OUT = Path(__file__).parent / "results" / "dit_gates"
TIMES = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95, 1.0)
MAP_TIMES = (0.1, 0.4, 0.7, 0.95)


def capture_gates(model: torch.nn.Module) -> List[Dict[str, torch.Tensor]]:
    """Hooks on every block: the gate's input x (B, H, W, C), its output rates (B, n, L), and the adaLN shift
    that the block added to every token of x before the gate saw it (B, C), and the tokens before adaLN (B, H, W, C)."""
    records: List[Dict[str, torch.Tensor]] = [{} for _ in model.blocks]
    for record, block in zip(records, model.blocks):
        def gate_hook(module, inputs, output, record=record):
            record["x"] = inputs[0].detach()
            record["rates"] = output.detach()

        def modulation_hook(module, inputs, output, record=record):
            record["shift"] = output.chunk(6, dim=1)[0].detach()
        def norm_hook(module, inputs, output, record=record):
            record["normed"] = output.detach()
        block.attn.gate.register_forward_hook(gate_hook)
        block.adaLN_modulation.register_forward_hook(modulation_hook)
        block.norm1.register_forward_hook(norm_hook)
    return records


def gate_logits(gate: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W_g^T + b: (B, H, W, C) -> (B, n, L) float32, before logsigmoid."""
    return torch.nn.functional.linear(x.float(), gate.weight.float(), gate.bias.float()).flatten(1, 2).transpose(1, 2)


def paired_ci(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """Mean of a - b over images with a normal 95% interval: [low, mean, high]."""
    diff = (a - b).double()
    half = 1.96 * float(diff.std()) / len(diff) ** 0.5
    return [float(diff.mean()) - half, float(diff.mean()), float(diff.mean()) + half]


def variance_shares(logits: torch.Tensor) -> Dict[str, float]:
    """logits (T, B, n, L): share of each head's variance that lies between t, between samples at one t,
    and between tokens of one sample (the three add up to 1), averaged over heads."""
    total = logits.var(dim=(0, 1, 3), unbiased=False)                                  # (n,)
    per_t = logits.mean(dim=(1, 3))                                                     # (T, n)
    per_sample = logits.mean(dim=3)                                                     # (T, B, n)
    between_t = per_t.var(dim=0, unbiased=False)
    between_samples = (per_sample - per_t[:, None]).pow(2).mean(dim=(0, 1))
    within = (logits - per_sample[..., None]).pow(2).mean(dim=(0, 1, 3))
    return {"noise level t": float((between_t / total).mean()),
            "sample at one t": float((between_samples / total).mean()),
            "token within a sample": float((within / total).mean())}


@torch.no_grad()
def main() -> None:
    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="test images per class (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cag", type=Path, default=STUDY / "cag",
                        help="the cag run folder to analyse (default: the rerun's; none and fixed are always the rerun's)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images, labels = fashion_mnist_tensors("test")
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:args.per_class] for c in range(10)])
    x_data = images_to_model(images[pick])
    y = labels[pick].long()
    noise = torch.randn(x_data.shape, generator=torch.Generator().manual_seed(args.seed))
    target = x_data - noise

    models = {kind: load_generator(str(STUDY / kind if kind != "cag" else args.cag))[0] for kind in ("none", "fixed", "cag")}
    cag = models["cag"]
    records = capture_gates(cag)
    lambdas = cag.blocks[0].attn.gate.fixed_rates  # (n,) RMT's rates, the same in every block (and = fixed's)
    assert torch.equal(lambdas, models["fixed"].blocks[0].attn.gate.fixed_rates)

    mse: Dict[str, List[torch.Tensor]] = {kind: [] for kind in models}  # per t: (B,) per-image velocity MSE
    rates, logits, unmodulated, shift_terms, xt_all = [], [], [], [], []
    for t in TIMES:
        tt = torch.full((len(y),), t)
        x_t = t * x_data + (1 - t) * noise
        for kind, model in models.items():
            out = model(x_t, tt * 1000.0, y)
            mse[kind].append((out - target).pow(2).flatten(1).mean(1))
        # the cag pass ran last: its hooks hold this t's gates
        rates.append(torch.stack([r["rates"] for r in records]))                        # (D, B, n, L)
        logits.append(torch.stack([gate_logits(b.attn.gate, r["x"]) for b, r in zip(cag.blocks, records)]))
        unmodulated.append(torch.stack([gate_logits(b.attn.gate, r["normed"]) for b, r in zip(cag.blocks, records)]))
        shift_terms.append(torch.stack([r["shift"] @ b.attn.gate.weight.T for b, r in zip(cag.blocks, records)]))
        xt_all.append(x_t)
    rates = torch.stack(rates)      # (T, D, B, n, L)
    logits = torch.stack(logits)    # (T, D, B, n, L)
    unmodulated = torch.stack(unmodulated)  # (T, D, B, n, L): the same gate on LayerNorm(x), without adaLN's shift and scale
    shift_terms = torch.stack(shift_terms)  # (T, D, B, n): W_g . shift, the part of every token's logit set by (t, y)
    depth, heads = rates.shape[1], rates.shape[3]
    grid = int(rates.shape[-1] ** 0.5)

    repo = Path(__file__).resolve().parent.parent
    cag_run = args.cag.resolve()
    stats = {"times": TIMES, "lambda": lambdas.tolist(), "images": len(y),
             "cag_run": str(cag_run.relative_to(repo) if cag_run.is_relative_to(repo) else args.cag),
             "gate_input": cag.blocks[0].gate_input,
             "velocity_mse": {k: [float(v.mean()) for v in vs] for k, vs in mse.items()},
             "cag_minus_fixed_ci95": [paired_ci(c, f) for c, f in zip(mse["cag"], mse["fixed"])],
             "fixed_minus_none_ci95": [paired_ci(f, n) for f, n in zip(mse["fixed"], mse["none"])],
             "blocks": []}
    for d in range(depth):
        gate = cag.blocks[d].attn.gate
        r = rates[:, d]  # (T, B, n, L)
        between_t = logits[:, d].mean(dim=(1, 3)).var(dim=0, unbiased=False)          # (n,)
        stats["blocks"].append({
            "alpha": gate.alpha.tolist(),
            "gate_weight_norm": gate.weight.norm(dim=1).tolist(),
            "rate_mean_per_t_head": r.mean(dim=(1, 3)).tolist(),             # (T, n)
            "rate_token_std_per_t_head": r.std(dim=3).mean(dim=1).tolist(),  # (T, n): spread over tokens, mean over samples
            "mean_abs_rate_minus_lambda": float((r - lambdas.view(1, 1, -1, 1)).abs().mean()),
            "logit_variance_shares": variance_shares(logits[:, d]),
            # how much of the drift of the mean logit with t the adaLN shift alone carries (1: all of it)
            # the drift of the mean logit with t if the gate read LayerNorm(x) instead of adaLN's output (1: same drift)
            "between_t_variance_without_adaln": float((unmodulated[:, d].mean(dim=(1, 3)).var(dim=0, unbiased=False) / between_t).mean()),
            "between_t_variance_from_shift": float((shift_terms[:, d].mean(dim=1).var(dim=0, unbiased=False) / between_t).mean()),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1))
    write_report(stats, args.out)
    plot_rates(stats, depth, heads, args.out)
    plot_maps(rates, torch.stack(xt_all), grid, args.out)
    print((args.out / "report.md").read_text())


def write_report(stats: Dict, out: Path) -> None:
    lam = np.array(stats["lambda"])
    lines = ["# Gates of the trained dit_n_2 cag model across noise levels", "",
             f"{stats['images']} Fashion-MNIST test images (equal per class), one noise draw, flow time t "
             f"(0 = noise, 1 = data); cag is `{stats['cag_run']}`. Written by `python -m experiments.dit_gates`.", "",
             "RMT's lambda per head: " + ", ".join(f"{v:.4f}" for v in lam), "",
             "## Velocity MSE per t (same images, noise and t for every model)", "",
             "| t | " + " | ".join(stats["velocity_mse"]) + " | cag - fixed [95% CI] | fixed - none [95% CI] |",
             "|---:|" + "---:|" * (len(stats["velocity_mse"]) + 2)]
    for i, t in enumerate(stats["times"]):
        row = [stats["velocity_mse"][k][i] for k in stats["velocity_mse"]]
        lo, mid, hi = stats["cag_minus_fixed_ci95"][i]
        lo2, mid2, hi2 = stats["fixed_minus_none_ci95"][i]
        lines.append(f"| {t:.2f} | " + " | ".join(f"{v:.4f}" for v in row)
                     + f" | {mid:+.4f} [{lo:+.4f}, {hi:+.4f}] | {mid2:+.4f} [{lo2:+.4f}, {hi2:+.4f}] |")
    lines += ["", "## Per block", "",
              "mean rate s = alpha * G over heads at t = 0 / 0.55 / 1 (lambda's mean is "
              f"{lam.mean():.4f}), mean |s - lambda|, token spread (std over tokens, mean over heads and t), and the "
              "share of the gate-logit variance between noise levels / between samples / between tokens, and the share of "
              "the between-t part that the adaLN shift term W_g . shift(t, y) carries alone; last, the between-t variance of the "
              "mean logit if the same gate read LayerNorm(x) without adaLN, relative to the model's (1: the same drift).", "",
              "| block | s @ t=0 | s @ 0.55 | s @ 1 | mean abs(s - lambda) | token std | var: t | var: sample | var: token | t-drift from shift | t-drift without adaLN |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    times = list(stats["times"])
    # the last two columns ask what adaLN adds to the gate's input: nothing when the gate reads LayerNorm(x)
    modulated = stats["gate_input"] == "modulated"
    if not modulated:
        lines[-2:-2] = ["This gate reads LayerNorm(x) (`gate_input=\"normalized\"`): the last two columns do not apply.", ""]
    for d, b in enumerate(stats["blocks"]):
        m = np.array(b["rate_mean_per_t_head"]).mean(axis=1)
        v = b["logit_variance_shares"]
        lines.append(f"| {d} | {m[0]:.4f} | {m[times.index(0.55)]:.4f} | {m[-1]:.4f} | {b['mean_abs_rate_minus_lambda']:.4f} | "
                     f"{np.array(b['rate_token_std_per_t_head']).mean():.4f} | {v['noise level t']:.2f} | "
                     f"{v['sample at one t']:.2f} | {v['token within a sample']:.2f} | "
                     + (f"{b['between_t_variance_from_shift']:.2f} | {b['between_t_variance_without_adaln']:.2f} |" if modulated
                        else "n/a | n/a |"))
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_rates(stats: Dict, depth: int, heads: int, out: Path) -> None:
    import matplotlib.pyplot as plt
    times = stats["times"]
    fig, axes = plt.subplots(2, depth, figsize=(3.2 * depth, 5.6), sharex=True)
    for d, b in enumerate(stats["blocks"]):
        mean = np.array(b["rate_mean_per_t_head"])
        spread = np.array(b["rate_token_std_per_t_head"])
        for h in range(heads):
            line, = axes[0, d].plot(times, mean[:, h], marker=".", label=f"head {h}")
            axes[0, d].axhline(stats["lambda"][h], color=line.get_color(), ls="--", lw=0.8)
            axes[1, d].plot(times, spread[:, h], marker=".", color=line.get_color())
        axes[0, d].set_title(f"block {d}")
        axes[1, d].set_xlabel("flow time t (0 noise, 1 data)")
    axes[0, 0].set_ylabel("mean rate s (dashed: lambda)")
    axes[1, 0].set_ylabel("std of s over tokens")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("dit_n_2 cag: gate rate against noise level")
    fig.tight_layout()
    fig.savefig(out / "gates_vs_t.png", dpi=110)
    plt.close(fig)


def plot_maps(rates: torch.Tensor, x_t: torch.Tensor, grid: int, out: Path, samples=(0, 175, 355)) -> None:
    """rates (T, D, B, n, L), x_t (T, B, 1, 28, 28): per sample, x_t and each block's head-averaged map at MAP_TIMES."""
    import matplotlib.pyplot as plt
    depth = rates.shape[1]
    cols = [TIMES.index(t) for t in MAP_TIMES]
    fig, axes = plt.subplots(len(samples) * (depth + 1), len(cols), figsize=(1.9 * len(cols), 1.9 * len(samples) * (depth + 1)))
    for s_i, s in enumerate(samples):
        for c_i, t_i in enumerate(cols):
            ax = axes[s_i * (depth + 1), c_i]
            ax.imshow(x_t[t_i, s, 0].numpy(), cmap="gray")
            ax.set_title(f"sample {s}, t={TIMES[t_i]}", fontsize=7)
            for d in range(depth):
                ax = axes[s_i * (depth + 1) + d + 1, c_i]
                im = ax.imshow(rates[t_i, d, s].mean(0).view(grid, grid).numpy(), cmap="viridis")
                ax.set_title(f"block {d} mean s", fontsize=7)
                fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "gate_maps.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
