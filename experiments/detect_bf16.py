"""Box mAP of one trained detection run scored three ways on its test mosaics: float32, bf16 autocast
as ``sdt.dense`` runs it (the heads' predictions cast to float32 before torchvision decodes boxes),
and bf16 autocast with torchvision's own behaviour (boxes decoded in bf16, the hooks removed).

    python -m experiments.detect_bf16 experiments/results/dense_study/detect-n4000-e2/sdt_h_nano-s0
"""
import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sdt.files import load_into, load_weights
from sdt.engine import load_config
from sdt.models.dense import prediction_heads
from sdt.tasks.detect import Detect, DetectConfig, build_detector
from sdt.engine import DistInfo, eval_loader
from sdt.data.mosaic import FashionMosaics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `sdt detect` run folder (config.yaml, best.safetensors)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DetectConfig, str(args.run / "config.yaml"))
    test = FashionMosaics(cfg.data, "test")
    model = build_detector(cfg.model, cfg.data.canvas).eval()
    load_into(model, load_weights(args.run / "best.safetensors"), args.run / "best.safetensors")
    task = Detect(test, test.num_classes, masks=cfg.model.detector == "maskrcnn")
    loader = eval_loader(test, cfg.engine.batch_size, 0, DistInfo())
    heads = prediction_heads(model)
    hooks = [dict(h._forward_hooks) for h in heads]
    print(f"{args.run}: {cfg.model.detector} on {cfg.model.backbone}, {len(test)} test mosaics of {cfg.data.canvas} px\n")
    print("| precision | box mAP | mAP@.5 | mAP@.75 | seconds |\n|---|---:|---:|---:|---:|")
    for name, autocast, keep_hooks in (("float32", False, True), ("bf16 autocast (sdt.dense)", True, True),
                                       ("bf16 autocast, boxes decoded in bf16", True, False)):
        for head, saved in zip(heads, hooks):
            head._forward_hooks.clear()
            if keep_hooks:
                head._forward_hooks.update(saved)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            m = task.evaluate(model, loader, DistInfo())
        print(f"| {name} | {m['map']:.2f} | {m['map_50']:.2f} | {m['map_75']:.2f} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
