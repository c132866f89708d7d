"""Train the Fashion-MNIST FID extractor shipped as ``sdt_h_nano.fmnist_extractor``.

A short plain loop (the shared training engine is not used so that this file alone records how the
shipped weights were made): sdt_h_nano, in_chans=1, num_classes=10, AdamW lr 2e-3 wd 0.05,
batch 128, cosine schedule, one thread, random 2-px shift + horizontal flip, seed 0, EMA-free.

    PYTHONPATH=src python scripts/train_fid_extractor.py --epochs 1 --steps 200 --out src/sdt/weights/sdt_h_nano_fmnist.safetensors
"""
import argparse
import math
import os
import time

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sdt  # noqa: F401  (registers the models)
from sdt.data import fashion_mnist_tensors
from sdt.models.sdt_h import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (zero padding) and horizontal flip, per image."""
    batch = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, batch), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(batch)])
    flip = torch.rand(batch, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        correct += (model(normalize(images[i:i + 500])).argmax(1) == labels[i:i + 500]).sum().item()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: full epochs)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="src/sdt/weights/sdt_h_nano_fmnist.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: more threads than free cores is far slower
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = fashion_mnist_tensors("train")
    test_x, test_y = fashion_mnist_tensors("test")
    model = timm.create_model("sdt_h_nano", in_chans=1, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(train_x) // args.batch_size
    if args.steps:
        steps_per_epoch = min(steps_per_epoch, args.steps)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = normalize(augment(train_x[idx], generator))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                print(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"{(epoch * steps_per_epoch + step + 1) * args.batch_size / (time.time() - start):.0f} img/s", flush=True)
        print(f"epoch {epoch} test accuracy {evaluate(model, test_x, test_y):.4f} ({time.time() - start:.0f}s)", flush=True)
    save_half(model.state_dict(), args.out, {
        "model": "sdt_h_nano", "in_chans": "1", "num_classes": "10", "epochs": str(args.epochs), "steps": str(total),
        "batch_size": str(args.batch_size), "lr": str(args.lr)})
    print(f"saved {args.out}")


def save_half(state: dict, path: str, metadata: dict) -> None:
    """Write floating-point tensors as float16 (half the size; timm casts back to float32 on load), atomically."""
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in state.items()}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
