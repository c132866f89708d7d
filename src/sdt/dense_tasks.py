"""Detection and semantic segmentation on top of ``sdt.engine``: configs, the two tasks (loss +
library metrics), the runs (``run_detection`` / ``run_segmentation``: checks, training, test
evaluation of the best weights, report, sample drawings) and their CLI commands.

    cfg = load_config(DetectConfig, "detect-mosaic", ["engine.epochs=1"])
    summary = run_detection(cfg, output_dir="runs/detect")
    cfg = load_config(SegmentConfig, "segment-mosaic", ["model.backbone=rmt_nano"])
    summary = run_segmentation(cfg, output_dir="runs/segment")

Data: ``sdt.mosaic.FashionMosaics`` (a mosaic benchmark built from Fashion-MNIST, not COCO). How
targets reach the loss: the engine's loader stacks ``(image, index)`` pairs with ``sdt.data.collate``,
so a batch's ``targets`` are the mosaics' indices, and the task looks each target up with
``dataset.target(index)`` (mosaics are pure functions of their index). Any dataset with that
``__getitem__ -> (image, index)`` / ``target(index) -> dict`` pair works; every target goes
through ``sdt.mosaic.check_detection_target`` / ``check_semantic_target``.

Metrics: torchmetrics' ``MeanAveragePrecision`` (COCO box mAP@[.5:.95], and mask mAP for Mask R-CNN;
backend faster-coco-eval, or pycocotools when only that is installed) and ``MulticlassJaccardIndex``
(mIoU over the 11 classes, background included, as ADE20K's mIoU counts every class); all in percent.
"""
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import atomic_path, atomic_write, load_into, load_weights
from .config import ConfigError
from .data import Batch, DataError
from .engine import (DistInfo, EngineConfig, Trainer, check_engine_settings, eval_loader, final_val_metrics, read_metrics,
                     resolve_run, start_run)
from .mosaic import (IGNORE_INDEX, MOSAIC_CLASSES, FashionMosaics, MosaicConfig, check_detection_target,
                     check_mosaic_config, check_semantic_target, describe)
from .plots import plot_curves

_logger = logging.getLogger("sdt")

__all__ = ["DetectConfig", "SegmentConfig", "DetectionTask", "SegmentationTask", "build_detector", "build_segmenter",
           "run_detection", "run_segmentation", "add_dense_commands", "coco_backend"]


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass
class BackboneConfig:
    backbone: str = "sdt_h_nano"                 # sdt_h_*, rmt_*, *_full2d, any timm features_only model, tv_resnet18
    out_indices: Optional[Tuple[int, ...]] = None  # feature levels into the FPN (None: all)
    fpn_channels: int = 64
    extra_blocks: str = "maxpool"                # maxpool, p6p7 or none
    pretrained: Optional[str] = None             # local classification weights (safetensors / RMT .pth)
    frozen_stages: int = -1                      # -1 none, 0 stem, n stem + first n stages
    norm_eval: bool = False                      # norm layers of the backbone in eval mode, frozen
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model arguments (e.g. stem_stride: 4)


@dataclass
class DetectModelConfig(BackboneConfig):
    detector: str = "fasterrcnn"                 # fasterrcnn, maskrcnn, retinanet, fcos
    detector_kwargs: Dict[str, Any] = field(default_factory=dict)  # torchvision detector arguments
    score_thresh: float = 0.5                    # drawings only: detections at least this confident


@dataclass
class SegmentModelConfig(BackboneConfig):
    head_channels: int = 64                      # Semantic-FPN head width


@dataclass
class DetectConfig:
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: MosaicConfig = field(default_factory=MosaicConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class SegmentConfig:
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: MosaicConfig = field(default_factory=MosaicConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def check_backbone_config(cfg: BackboneConfig) -> None:
    """The model section on its own (``ConfigError``)."""
    if cfg.fpn_channels < 1:
        raise ConfigError(f"model.fpn_channels must be at least 1, got {cfg.fpn_channels}")
    if cfg.frozen_stages < -1:
        raise ConfigError(f"model.frozen_stages must be -1 (nothing frozen) or more, got {cfg.frozen_stages}")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"model.pretrained: {cfg.pretrained} is not a file (pass a .safetensors of a run or "
                          f"`sdt convert`, or RMT's released .pth)")


def _in_chans() -> int:
    return 1  # Fashion-MNIST mosaics are grayscale


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    from .dense import create_backbone

    return create_backbone(cfg.backbone, in_chans=_in_chans(), out_indices=cfg.out_indices, fpn_channels=cfg.fpn_channels,
                           extra_blocks=cfg.extra_blocks, pretrained=cfg.pretrained, frozen_stages=cfg.frozen_stages,
                           norm_eval=cfg.norm_eval, model_kwargs=cfg.kwargs)


def build_detector(cfg: DetectModelConfig, canvas: int, num_classes: int = len(MOSAIC_CLASSES)) -> nn.Module:
    """The torchvision detector of ``cfg`` for ``canvas``-pixel mosaics (``num_classes`` with background)."""
    from .dense import create_detector

    try:
        return create_detector(cfg.detector, build_backbone(cfg), num_classes, canvas, **cfg.detector_kwargs)
    except TypeError as e:
        raise ConfigError(f"model.detector_kwargs {cfg.detector_kwargs} do not fit {cfg.detector}: {e}") from e


def build_segmenter(cfg: SegmentModelConfig, num_classes: int = len(MOSAIC_CLASSES)) -> nn.Module:
    from .dense import create_segmenter

    return create_segmenter(build_backbone(cfg), num_classes, cfg.head_channels)


def coco_backend() -> str:
    """The COCO evaluator torchmetrics' ``MeanAveragePrecision`` will use: faster_coco_eval if installed,
    else pycocotools; a ``ConfigError`` naming the install command when neither is."""
    import importlib.util

    for module in ("faster_coco_eval", "pycocotools"):
        if importlib.util.find_spec(module) is not None:
            return module
    raise ConfigError("box mAP needs a COCO evaluator: pip install faster-coco-eval (or pycocotools), "
                      "or pip install 'sdt[dense]'")


# ---------------------------------------------------------------------------------------------
# Tasks


def _targets_of(dataset: Dataset, indices: Tensor) -> List[Dict[str, Tensor]]:
    if not hasattr(dataset, "target"):
        raise DataError(f"{type(dataset).__name__} has no target(index) method; dense tasks need datasets that "
                        f"return (image, index) and give each index's targets (see sdt.mosaic.FashionMosaics)")
    return [dataset.target(int(i)) for i in indices.tolist()]


class DetectionTask:
    """Sum of a torchvision detector's losses; COCO mAP (torchmetrics) on evaluation.

    ``loss``: batch images (B, C, H, W), batch targets (B,) mosaic indices into ``train_set``.
    ``evaluate`` -> ``{"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"}``
    in percent (``mask_map`` / ``mask_map_50`` too for Mask R-CNN; a size class absent from the ground truth
    is left out), gathered over processes by torchmetrics.
    """
    metric = "map"
    KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")

    def __init__(self, train_set: Dataset, num_classes: int, masks: bool):
        self.train_set, self.num_classes, self.masks = train_set, num_classes, masks
        self.backend = coco_backend()

    def targets(self, dataset: Dataset, indices: Tensor, image_size: Tuple[int, int], device: torch.device) -> List[Dict[str, Tensor]]:
        """Checked detection targets of the mosaics ``indices`` (``DataError`` on a bad one), on ``device``."""
        out = []
        for i, t in zip(indices.tolist(), _targets_of(dataset, indices)):
            check_detection_target(t, image_size, self.num_classes, where=f"{type(dataset).__name__}[{i}]", need_masks=self.masks)
            target = {"boxes": t["boxes"].float().to(device), "labels": t["labels"].long().to(device)}
            if self.masks:
                target["masks"] = t["masks"].to(device, torch.uint8)
            out.append(target)
        return out

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        images = batch.images
        losses = model(list(images), self.targets(self.train_set, batch.targets, tuple(images.shape[-2:]), images.device))
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        was_training = model.training
        model.eval()
        iou_type = ("bbox", "segm") if self.masks else "bbox"
        metric = MeanAveragePrecision(iou_type=iou_type, backend=self.backend).to(dist_info.device)
        for batch in loader:
            images = batch.images.to(dist_info.device)
            targets = self.targets(loader.dataset, batch.targets, tuple(images.shape[-2:]), dist_info.device)
            preds = model(list(images))
            for p, t in zip(preds, targets):
                p["boxes"], p["scores"] = p["boxes"].float(), p["scores"].float()
                if self.masks:
                    p["masks"] = p["masks"][:, 0] > 0.5
                    t["masks"] = t["masks"].bool()
            metric.update(preds, targets)
        result = metric.compute()
        model.train(was_training)
        prefix = "bbox_" if self.masks else ""
        # COCO's -1 means "no object of that size in the ground truth": such keys are left out
        out = {k: 100 * result[prefix + k].item() for k in self.KEYS if result[prefix + k].item() >= 0}
        if self.masks:
            out.update({f"mask_{k}": 100 * result[f"segm_{k}"].item() for k in ("map", "map_50")})
        return out


class SegmentationTask:
    """Per-pixel cross-entropy (``IGNORE_INDEX`` pixels left out); mIoU, pixel accuracy and loss on evaluation.

    ``loss``: batch images (B, C, H, W), batch targets (B,) indices; semantic maps (B, H, W).
    ``evaluate`` -> ``{"miou", "pixel_acc", "loss"}`` (percent, percent, mean per pixel), reduced over
    processes; ``per_class=True`` adds ``iou_<class>`` for each class.
    """
    metric = "miou"

    def __init__(self, train_set: Dataset, num_classes: int, class_names: Optional[List[str]] = None):
        self.train_set, self.num_classes = train_set, num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]

    def semantic(self, dataset: Dataset, indices: Tensor, image_size: Tuple[int, int], device: torch.device) -> Tensor:
        maps = []
        for i, t in zip(indices.tolist(), _targets_of(dataset, indices)):
            if "semantic" not in t:
                raise DataError(f"{type(dataset).__name__}[{i}]: a segmentation target needs 'semantic' (H, W)")
            check_semantic_target(t["semantic"], image_size, self.num_classes, where=f"{type(dataset).__name__}[{i}]")
            maps.append(t["semantic"].long())
        return torch.stack(maps).to(device)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        images = batch.images
        target = self.semantic(self.train_set, batch.targets, tuple(images.shape[-2:]), images.device)
        return F.cross_entropy(model(images).float(), target, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo, per_class: bool = False) -> Dict[str, float]:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        was_training = model.training
        model.eval()
        k, device = self.num_classes, dist_info.device
        iou = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE_INDEX).to(device)
        acc = MulticlassAccuracy(k, average="micro", ignore_index=IGNORE_INDEX).to(device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, counted pixels
        for batch in loader:
            images = batch.images.to(device)
            target = self.semantic(loader.dataset, batch.targets, tuple(images.shape[-2:]), device)
            logits = model(images).float()
            sums[0] += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            sums[1] += (target != IGNORE_INDEX).sum()
            pred = logits.argmax(1)
            iou.update(pred, target)
            acc.update(pred, target)
        if dist_info.distributed:
            dist.all_reduce(sums)
        per = iou.compute()
        model.train(was_training)
        out = {"miou": 100 * per.mean().item(), "pixel_acc": 100 * acc.compute().item(),
               "loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if per_class:
            out.update({f"iou_{name}": 100 * v for name, v in zip(self.class_names, per.tolist())})
        return out


# ---------------------------------------------------------------------------------------------
# Drawings


def _to_rgb(image: Tensor) -> Tensor:
    """(C, H, W) float in [0, 1] -> (3, H, W) uint8."""
    image = (image.clamp(0, 1) * 255).to(torch.uint8)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image[:3]


def _palette(n: int) -> List[Tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [(0, 0, 0)] + [tuple(int(255 * c) for c in cmap(i % 10)[:3]) for i in range(n - 1)]


def _save_grid(tiles: List[Tensor], ncol: int, path: Path) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.stack(tiles), nrow=ncol, padding=2, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


@torch.no_grad()
def draw_detections(model: nn.Module, dataset: FashionMosaics, indices: List[int], path: Path,
                    score_thresh: float = 0.5, scale: int = 2) -> None:
    """PNG: per mosaic, ground truth (left) and the detections scoring >= ``score_thresh`` (right; masks
    too for Mask R-CNN), class names on the boxes; each tile upscaled ``scale`` x for legibility."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    colors = _palette(len(MOSAIC_CLASSES))
    tiles = []
    for i in indices:
        s = dataset.sample(i)
        pred = model([s["image"].to(device)])[0]
        keep = pred["scores"] >= score_thresh
        base = _to_rgb(s["image"])
        for boxes, labels, masks, scores in ((s["boxes"], s["labels"], s["masks"].bool(), None),
                                             (pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(),
                                              pred["masks"][keep, 0].cpu() > 0.5 if "masks" in pred else None,
                                              pred["scores"][keep].cpu())):
            tile = F.interpolate(base[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
            if masks is not None and len(masks):
                masks = F.interpolate(masks[None].float(), scale_factor=scale, mode="nearest")[0].bool()
                tile = draw_segmentation_masks(tile, masks, alpha=0.4, colors=[colors[int(c)] for c in labels])
            names = [MOSAIC_CLASSES[int(c)] + ("" if scores is None else f" {scores[k]:.2f}") for k, c in enumerate(labels)]
            if len(boxes):
                tile = draw_bounding_boxes(tile, boxes * scale, names, colors=[colors[int(c)] for c in labels], width=2)
            tiles.append(tile)
    model.train(was_training)
    _save_grid(tiles, 4, path)


@torch.no_grad()
def draw_segmentations(model: nn.Module, dataset: FashionMosaics, indices: List[int], path: Path, scale: int = 2) -> None:
    """PNG: per mosaic, the image, the true semantic map and the predicted one (class colours)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    colors = torch.tensor(_palette(len(MOSAIC_CLASSES)), dtype=torch.uint8)
    tiles = []
    for i in indices:
        s = dataset.sample(i)
        pred = model(s["image"][None].to(device))[0].argmax(0).cpu()
        for tile in (_to_rgb(s["image"]), colors[s["semantic"]].permute(2, 0, 1), colors[pred].permute(2, 0, 1)):
            tiles.append(F.interpolate(tile[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8))
    model.train(was_training)
    _save_grid(tiles, 6, path)


# ---------------------------------------------------------------------------------------------
# Runs


def _check_first_targets(task: Any, dataset: FashionMosaics) -> None:
    """Generate and check the first mosaics' targets before anything is written."""
    indices = torch.arange(min(len(dataset), 4))
    size = (dataset.cfg.canvas, dataset.cfg.canvas)
    if isinstance(task, DetectionTask):
        task.targets(dataset, indices, size, torch.device("cpu"))
    else:
        task.semantic(dataset, indices, size, torch.device("cpu"))


def _run(kind: str, config_class: type, cfg: Any, output_dir: Optional[str], resume: Optional[str]) -> Dict[str, Any]:
    cfg, info, out, resume_from = resolve_run(config_class, cfg, output_dir, resume,
                                                  kind if cfg is None else f"{kind}-{cfg.model.backbone}")
    # Every check on config, data and model runs before any file is written.
    check_backbone_config(cfg.model)
    check_mosaic_config(cfg.data)
    check_engine_settings(cfg.engine)
    datasets = {split: FashionMosaics(cfg.data, split) for split in ("train", "val")}
    num_classes = FashionMosaics.num_classes
    torch.manual_seed(cfg.engine.seed)
    if kind == "detect":
        model = build_detector(cfg.model, cfg.data.canvas, num_classes)
        task: Any = DetectionTask(datasets["train"], num_classes, masks=cfg.model.detector == "maskrcnn")
    else:
        model = build_segmenter(cfg.model, num_classes)
        task = SegmentationTask(datasets["train"], num_classes, MOSAIC_CLASSES)
    stride = model.backbone.stride
    if cfg.data.canvas % stride:
        raise ConfigError(f"data.canvas={cfg.data.canvas} must be a multiple of the backbone's stride {stride}")
    for ds in datasets.values():
        _check_first_targets(task, ds)
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    trainer = Trainer(cfg.engine, model, task, datasets["train"], datasets["val"], out, info,
                      workers=cfg.data.workers, resume_from=resume_from)

    with start_run(cfg, out, info, resume_from is not None):
        what = cfg.model.detector if kind == "detect" else "semantic-fpn"
        _logger.info("%s %s on %s: %.2fM parameters (backbone + FPN %.2fM); %d processes on %s; output %s",
                     kind, what, cfg.model.backbone, params / 1e6, backbone_params / 1e6, info.world_size, info.device, out)
        _logger.info("data: Fashion-MNIST mosaics %dx%d, %d train / %d val", cfg.data.canvas, cfg.data.canvas,
                     len(datasets["train"]), len(datasets["val"]))
        wall_start = time.perf_counter()
        summary = trainer.fit()
        train_wall = time.perf_counter() - wall_start

        test_set = FashionMosaics(cfg.data, "test")
        if info.distributed:
            dist.barrier()
        best_path = out / "best.safetensors"
        load_into(trainer.model, load_weights(best_path), best_path)
        loader = eval_loader(test_set, trainer.batch_size_per_rank, cfg.data.workers, info)
        start = time.perf_counter()
        if kind == "detect":
            test = task.evaluate(trainer.model, loader, info)
        else:
            test = task.evaluate(trainer.model, loader, info, per_class=True)
        test_seconds = time.perf_counter() - start
        summary.update(task=kind, model=what, backbone=cfg.model.backbone, params=params, backbone_params=backbone_params,
                       data=describe(cfg.data), test=test, test_images_per_s=len(test_set) / max(test_seconds, 1e-9),
                       wall_seconds=train_wall, processes=info.world_size)
        if info.is_main:
            summary["final_val"] = final_val_metrics(out)
            plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png", task.metric)
            samples = list(range(min(8, len(test_set))))
            if kind == "detect":
                draw_detections(trainer.model, test_set, samples, out / "samples.png", cfg.model.score_thresh)
            else:
                draw_segmentations(trainer.model, test_set, samples, out / "samples.png")
            atomic_write(out / "summary.json", json.dumps(summary, indent=2))
            atomic_write(out / "report.md", render_report(summary, cfg))
            _logger.info("done: best val %s %.2f (epoch %d, %s), test %s %.2f, report %s", task.metric,
                         summary["best"]["value"], summary["best"]["epoch"], summary["best"]["source"], task.metric,
                         test[task.metric], out / "report.md")
        return summary


def run_detection(cfg: DetectConfig, output_dir: Optional[str] = None, resume: Optional[str] = None) -> Dict[str, Any]:
    """Train a detector as ``cfg`` says on the Fashion-MNIST mosaics, then score the best validation
    weights on the test mosaics (box mAP). ``resume``: ``"auto"`` or a checkpoint folder (the run then
    continues with the config saved in ``output_dir``). Writes the run folder of ``sdt.engine`` plus
    summary.json, report.md, curves.png and samples.png; returns the summary."""
    return _run("detect", DetectConfig, cfg, output_dir, resume)


def run_segmentation(cfg: SegmentConfig, output_dir: Optional[str] = None, resume: Optional[str] = None) -> Dict[str, Any]:
    """As ``run_detection``, for semantic segmentation (Semantic-FPN head, mIoU)."""
    return _run("segment", SegmentConfig, cfg, output_dir, resume)


def render_report(s: Dict[str, Any], cfg: Any) -> str:
    metric = "map" if s["task"] == "detect" else "miou"
    label = "box mAP@[.5:.95]" if metric == "map" else "mIoU"
    rows = [
        ("task", f"{s['task']} ({s['model']}) on `{s['backbone']}`, {s['params'] / 1e6:.2f}M parameters "
                 f"({s['backbone_params'] / 1e6:.2f}M backbone + FPN)"),
        ("data", "Fashion-MNIST mosaics (not COCO), {c}x{c}, {train} train / {val} val / {test} test, benchmark seed {seed}".format(
            c=s["data"]["canvas"], seed=s["data"]["seed"], **s["data"]["images"])),
        ("epochs / global batch / processes", f"{cfg.engine.epochs} / {cfg.engine.batch_size} / {s['processes']}"),
        (f"best val {label}", f"{s['best']['value']:.2f} (epoch {s['best']['epoch']}, {s['best']['source']} weights)"),
        (f"test {label} (best weights)", f"{s['test'][metric]:.2f}"),
    ]
    if metric == "map":
        rows.append(("test mAP@.5 / mAP@.75 / AR@100", f"{s['test']['map_50']:.2f} / {s['test']['map_75']:.2f} / {s['test']['mar_100']:.2f}"))
        if "mask_map" in s["test"]:
            rows.append(("test mask mAP / mask mAP@.5", f"{s['test']['mask_map']:.2f} / {s['test']['mask_map_50']:.2f}"))
    else:
        rows.append(("test pixel accuracy / loss", f"{s['test']['pixel_acc']:.2f}% / {s['test']['loss']:.4f}"))
    rows += [("wall time (train + val, this segment)", f"{s['wall_seconds'] / 60:.1f} min"),
             ("training throughput", f"{s['train_images_per_s']:.1f} images/s"),
             ("test throughput (with metric)", f"{s['test_images_per_s']:.1f} images/s")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {s['task'].capitalize()} report\n\n| | |\n|---|---|\n{table}\n\n![curves](curves.png)\n\n"
            f"Test mosaics: ![samples](samples.png)\n\nConfig: `config.yaml`; metrics: `metrics.jsonl`, `tb/`.\n")


# ---------------------------------------------------------------------------------------------
# CLI (wired into sdt.cli by ``add_dense_commands(subparsers)``)


def add_dense_commands(subparsers: Any) -> None:
    """``sdt detect`` and ``sdt segment``: a run from a recipe, -o overrides, --output, --resume."""
    import argparse

    from .cli import add_run_arguments

    for name, recipe, help_text in (
            ("detect", "detect-mosaic", "train a detector (Faster/Mask R-CNN, RetinaNet, FCOS) on Fashion-MNIST mosaics"),
            ("segment", "segment-mosaic", "train a Semantic-FPN segmenter on Fashion-MNIST mosaics")):
        p = subparsers.add_parser(
            name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{help_text[0].upper() + help_text[1:]} (a mosaic benchmark, not COCO; docs/dense.md). "
                        "The run folder gets config.yaml, checkpoints, metrics.jsonl, TensorBoard logs, curves.png, "
                        "samples.png, summary.json and report.md.",
            epilog="examples:\n"
                   f"  sdt {name}                                     # recipe {recipe}, sdt_h_nano\n"
                   f"  sdt {name} --backbone rmt_nano --output runs/{name}-rmt\n"
                   + ("  sdt detect --detector maskrcnn -o engine.epochs=4\n" if name == "detect" else "")
                   + f"  sdt {name} --output runs/{name}-rmt --resume        # continue after a crash")
        add_run_arguments(p, f"recipe name (default {recipe}) or path to a YAML file", f"runs/{name}-<backbone>-<date>-<time>")
        p.add_argument("--backbone", help="= -o model.backbone=... (sdt_h_nano, rmt_nano, sdt_h_nano_full2d, tv_resnet18, ...)")
        if name == "detect":
            p.add_argument("--detector", choices=("fasterrcnn", "maskrcnn", "retinanet", "fcos"), help="= -o model.detector=...")
        p.add_argument("--epochs", type=int, help="= -o engine.epochs=...")
        p.add_argument("--batch-size", type=int, help="global batch size (= -o engine.batch_size=...)")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config value, e.g. -o data.canvas=192 -o model.frozen_stages=1 (repeatable)")
        p.set_defaults(func=_run_detect_cli if name == "detect" else _run_segment_cli, dense_recipe=recipe)


def _dense_cfg(args: Any, config_class: type, flags: Dict[str, str]) -> Optional[Any]:
    from .cli import _recipe_and_overrides

    return _recipe_and_overrides(args, {**flags, "epochs": "engine.epochs", "batch_size": "engine.batch_size"},
                                 config_class, default_recipe=args.dense_recipe)


def _run_detect_cli(args: Any) -> int:
    cfg = _dense_cfg(args, DetectConfig, {"backbone": "model.backbone", "detector": "model.detector"})
    run_detection(cfg or DetectConfig(), args.output, args.resume)
    return 0


def _run_segment_cli(args: Any) -> int:
    cfg = _dense_cfg(args, SegmentConfig, {"backbone": "model.backbone"})
    run_segmentation(cfg or SegmentConfig(), args.output, args.resume)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m sdt.dense_tasks detect|segment ...``: the commands before (and besides) ``sdt detect``;
    bad input is one line on stderr and exit status 2, as in ``sdt``."""
    import argparse
    import sys

    from .errors import SdtError

    parser = argparse.ArgumentParser(prog="python -m sdt.dense_tasks")
    add_dense_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SdtError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
