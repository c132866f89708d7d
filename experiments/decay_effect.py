"""How much does the decay bias matter inside a trained classifier? A check to read beside the ablation.

    python -m experiments.decay_effect runs/fmnist-sdt_h_nano [--images 2000]

Loads a run's best weights (``sdt train``), scores the first ``--images`` Fashion-MNIST test images
as trained and with the decay removed from every attention layer (``decay="none"``, same weights;
gate parameters, if any, are ignored), and prints the accuracy of both, the relative change of the
logits and how many predictions change. It also prints, per block, the size of the attention branch relative to
the residual stream it is added to, and the share of the branch that comes from attention proper
(the rest is LCE): if attention is a small part of a small branch, no decay variant can move
accuracy much.
"""
import argparse
from pathlib import Path

import timm
import torch

import sdt  # noqa: F401  (registers the models)
from sdt.attention import SpatialDecayAttention
from sdt.engine import load_config
from sdt.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_tensors
from sdt.files import load_weights
from sdt.tasks.classify import TrainConfig


def build(cfg: TrainConfig, **overrides) -> torch.nn.Module:
    kwargs = {**cfg.model.kwargs, **overrides}
    return timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans, **kwargs).eval()


@torch.no_grad()
def branch_sizes(model: torch.nn.Module, x: torch.Tensor) -> list:
    """Per block: (grid, |attention branch| / |residual stream|, share of attention proper in the
    branch, the rest being LCE). The branch is what the block adds: layerscale(attn(norm1(x)))."""
    rows, busy = [], []

    def hook(block, inputs, residual):  # forward hook on norm1: its input is the residual stream
        if busy:
            return
        busy.append(True)
        normed = block.norm1(inputs[0])
        branch = block.ls1(block.attn(normed))
        lce, block.attn.lce = block.attn.lce, None
        attention_only = block.ls1(block.attn(normed))
        block.attn.lce = lce
        busy.clear()
        rows.append((tuple(inputs[0].shape[1:3]), (branch.norm() / inputs[0].norm()).item(),
                     (attention_only.norm() / branch.norm()).item()))

    blocks = [m for m in model.modules() if hasattr(m, "attn") and isinstance(m.attn, SpatialDecayAttention)]
    handles = [b.norm1.register_forward_hook(lambda mod, inp, out, b=b: hook(b, inp, out)) for b in blocks]
    model(x)
    for h in handles:
        h.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder of 'sdt train' on Fashion-MNIST")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = load_config(TrainConfig, str(run / "config.yaml"))
    weights = load_weights(run / "best.safetensors")
    images, labels = fashion_mnist_tensors("test", cfg.data.data_dir)
    x = (images[:args.images].float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    y = labels[:args.images]
    trained = build(cfg)
    trained.load_state_dict(weights)
    no_decay = build(cfg, decay="none")
    no_decay.load_state_dict({k: v for k, v in weights.items() if k in no_decay.state_dict()})
    with torch.no_grad():
        a, b = trained(x), no_decay(x)
    # what the built model uses (a model's default, or per stage), not a guess from its name
    decay = "/".join(dict.fromkeys(m.gate.decay for m in trained.modules() if isinstance(m, SpatialDecayAttention)))
    print(f"{run}: {cfg.model.name} (decay {decay}), first {len(y)} test images")
    print(f"  top-1 as trained {100 * (a.argmax(1) == y).float().mean():.2f}%, decay removed "
          f"{100 * (b.argmax(1) == y).float().mean():.2f}%; |logit change| / |logits| {(a - b).norm() / a.norm():.4f}; "
          f"predictions changed: {(a.argmax(1) != b.argmax(1)).sum().item()} of {len(y)}")
    print("  blocks: grid, |attention branch| / |residual stream|, |attention proper| / |branch| (the branch is attention + LCE)")
    for grid, size, share in branch_sizes(trained, x[:256]):
        print(f"    {grid[0]}x{grid[1]}  {size:.3f}  {share:.2f}")


if __name__ == "__main__":
    main()
