"""Dense-prediction cost per backbone: a torchvision detector (Faster R-CNN by default) and the
Semantic-FPN segmenter on sdt_h_nano, rmt_nano and torchvision's ResNet-18 FPN at one canvas
(train step and inference: images/s, peak memory, ratios to ResNet-18), and the resolution scaling
of the decomposed layout against full 2D decay under the detector (sdt_h_nano vs sdt_h_nano_full2d,
and rmt_nano) at 2-4 canvas sizes.

Cases are interleaved round by round and medians reported (``_measure.interleaved_medians``), so
load from other processes hits every case alike; absolute numbers still need an idle machine. The
load average (``os.getloadavg``) is printed before and after: quote the numbers only when it is
low. The backbones use the recipes' setting (``stem_stride=4``: FPN inputs at strides 4-32), and the
R-CNN heads the ``detect-mosaic`` recipe's (``--torchvision-defaults``: torchvision's COCO settings).

    PYTHONPATH=src python benchmarks/bench_dense.py                       # both tables, canvas 128, batch 8
    PYTHONPATH=src python benchmarks/bench_dense.py --detector maskrcnn --canvas 192 --sizes 128 256 384 512
    PYTHONPATH=src python benchmarks/bench_dense.py --quick              # a smoke run (seconds)
"""
import argparse
import os
from typing import Callable, Dict, List, Tuple

import torch

from _measure import environment, interleaved_medians, markdown_table, peak_memory_gib
from sdt.models.dense import create_backbone, create_detector, create_segmenter

BACKBONES = ("sdt_h_nano", "rmt_nano", "tv_resnet18")
SCALING = ("sdt_h_nano", "sdt_h_nano_full2d", "rmt_nano")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


DETECTOR_KWARGS: Dict[str, object] = {}  # set in main: the detect-mosaic recipe's, or torchvision's defaults


def _model(kind: str, backbone: str, canvas: int, fpn: int) -> torch.nn.Module:
    kwargs = None if backbone.startswith("tv_") else {"stem_stride": 4}
    if kind == "segment":
        return create_segmenter(create_backbone(backbone, in_chans=1, fpn_channels=fpn, extra_blocks="none",
                                                model_kwargs=kwargs), 11)
    extra = DETECTOR_KWARGS if kind in ("fasterrcnn", "maskrcnn") else {}
    return create_detector(kind, create_backbone(backbone, in_chans=1, fpn_channels=fpn, model_kwargs=kwargs), 11, canvas,
                           **extra)


def _batch(canvas: int, batch: int) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]], torch.Tensor]:
    """Real mosaic-like targets: two boxes per image with masks; and (B, H, W) semantic maps."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(1, canvas, canvas, generator=g))
        s = canvas // 4
        boxes = torch.tensor([[s * 0.2, s * 0.3, s * 1.8, s * 1.9], [s * 2.1, s * 2.0, s * 3.8, s * 3.9]])
        masks = torch.zeros(2, canvas, canvas, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 5]), "masks": masks})
    semantic = torch.randint(0, 11, (batch, canvas, canvas), generator=g)
    return images, targets, semantic


def _step_fns(kind: str, model: torch.nn.Module, canvas: int, batch: int) -> Tuple[Callable[[], None], Callable[[], None]]:
    images, targets, semantic = _batch(canvas, batch)
    stacked = torch.stack(images)

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        if kind == "segment":
            loss = torch.nn.functional.cross_entropy(model(stacked), semantic)
        else:
            loss = sum(model(images, targets).values())
        loss.backward()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        model(stacked) if kind == "segment" else model(images)

    return train_step, infer


def per_backbone(kind: str, canvas: int, batch: int, fpn: int, rounds: int) -> str:
    models = {b: _model(kind, b, canvas, fpn) for b in BACKBONES}
    fns = {b: _step_fns(kind, m, canvas, batch) for b, m in models.items()}
    train = interleaved_medians({b: f[0] for b, f in fns.items()}, rounds, warmup=2)
    infer = interleaved_medians({b: f[1] for b, f in fns.items()}, rounds, warmup=2)
    rows = []
    base_train, base_infer = batch / train["tv_resnet18"], batch / infer["tv_resnet18"]
    for b in BACKBONES:
        params = sum(p.numel() for p in models[b].parameters()) / 1e6
        mem_train = peak_memory_gib(fns[b][0])
        mem_infer = peak_memory_gib(fns[b][1])
        t, i = batch / train[b], batch / infer[b]
        rows.append([b, f"{params:.2f}", f"{t:.2f}", f"{t / base_train:.2f}x", f"{mem_train:.2f}",
                     f"{i:.2f}", f"{i / base_infer:.2f}x", f"{mem_infer:.2f}"])
    return markdown_table(["backbone", "params (M)", "train img/s", "vs R18", "train peak GiB",
                           "infer img/s", "vs R18", "infer peak GiB"], rows)


def scaling(kind: str, sizes: List[int], batch: int, fpn: int, rounds: int) -> str:
    rows = []
    for canvas in sizes:
        models = {b: _model(kind, b, canvas, fpn) for b in SCALING}
        fns = {b: _step_fns(kind, m, canvas, batch) for b, m in models.items()}
        train = interleaved_medians({b: f[0] for b, f in fns.items()}, rounds, warmup=2)
        infer = interleaved_medians({b: f[1] for b, f in fns.items()}, rounds, warmup=2)
        for b in SCALING:
            rows.append([str(canvas), b, f"{1000 * train[b] / batch:.0f}", f"{peak_memory_gib(fns[b][0]):.2f}",
                         f"{1000 * infer[b] / batch:.0f}", f"{peak_memory_gib(fns[b][1]):.2f}",
                         f"{train[b] / train['sdt_h_nano']:.2f}x"])
    return markdown_table(["canvas", "backbone", "train ms/img", "train peak GiB", "infer ms/img", "infer peak GiB",
                           "train time vs decomposed"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="fasterrcnn", choices=("fasterrcnn", "maskrcnn", "retinanet", "fcos"))
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256, 384])
    parser.add_argument("--scaling-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--torchvision-defaults", action="store_true",
                        help="R-CNN heads with torchvision's COCO settings instead of the detect-mosaic recipe's")
    parser.add_argument("--quick", action="store_true", help="canvas 64, batch 2, sizes 64 128, 1 round: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.canvas, args.batch, args.sizes, args.scaling_batch, args.rounds = 64, 2, [64, 128], 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.torchvision_defaults:
        from sdt.engine import load_config
        from sdt.tasks.detect import DetectConfig

        DETECTOR_KWARGS.update(load_config(DetectConfig, "detect-mosaic").model.detector_kwargs)
    print(environment())
    print(f"before: {_load()}")
    for kind in (args.detector, "segment"):
        heads = "" if kind == "segment" else f", R-CNN settings {DETECTOR_KWARGS or 'torchvision defaults'}"
        print(f"\n## {kind} at {args.canvas}x{args.canvas}, batch {args.batch}, FPN width {args.fpn_channels}{heads}\n")
        print(per_backbone(kind, args.canvas, args.batch, args.fpn_channels, args.rounds))
    print(f"\n## resolution scaling under {args.detector}, batch {args.scaling_batch}\n")
    print(scaling(args.detector, args.sizes, args.scaling_batch, args.fpn_channels, args.rounds))
    print(f"\nafter: {_load()}")


if __name__ == "__main__":
    main()
