"""Detection and semantic segmentation on top of ``sdt.engine``: configs, the two tasks (loss +
library metrics), the runs (``run_detection`` / ``run_segmentation``: checks, training, test
evaluation of the best weights, report, sample drawings); `sdt detect` / `sdt segment` (sdt.cli) run them.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import atomic_path, load_into, load_weights
from .config import ConfigError
from .data import Batch, DataError
from .engine import DistInfo, EngineConfig, RunParts, Trainer, check_engine_settings, eval_loader, run_task
from .mosaic import (IGNORE_INDEX, MOSAIC_CLASSES, FashionMosaics, MosaicConfig, check_detection_target,
                     check_mosaic_config, check_semantic_target, describe)


__all__ = ["DetectConfig", "SegmentConfig", "DetectionTask", "SegmentationTask", "build_detector", "build_segmenter",
           "run_detection", "run_segmentation", "coco_backend"]


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


def _builder(kind: str) -> Callable[[Any, DistInfo], RunParts]:
    """The ``sdt.engine.run_task`` builder of a detection or segmentation run: every check on config,
    data and model (nothing is written yet), then the parts; ``finish`` scores the best validation
    weights on the test mosaics and draws samples."""

    def build(cfg: Any, info: DistInfo) -> RunParts:
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
        what = cfg.model.detector if kind == "detect" else "semantic-fpn"
        label = "box mAP@[.5:.95]" if kind == "detect" else "mIoU"

        def finish(trainer: Trainer, summary: Dict[str, Any]) -> None:
            test_set = FashionMosaics(cfg.data, "test")
            if info.distributed:
                dist.barrier()
            best_path = trainer.output_dir / "best.safetensors"
            load_into(trainer.model, load_weights(best_path), best_path)
            loader = eval_loader(test_set, trainer.batch_size_per_rank, cfg.data.workers, info)
            start = time.perf_counter()
            test = (task.evaluate(trainer.model, loader, info) if kind == "detect"
                    else task.evaluate(trainer.model, loader, info, per_class=True))
            summary.update(test=test, test_images_per_s=len(test_set) / max(time.perf_counter() - start, 1e-9))
            if info.is_main:
                samples = list(range(min(8, len(test_set))))
                if kind == "detect":
                    draw_detections(trainer.model, test_set, samples, trainer.output_dir / "samples.png", cfg.model.score_thresh)
                else:
                    draw_segmentations(trainer.model, test_set, samples, trainer.output_dir / "samples.png")

        def report_rows(s: Dict[str, Any]) -> List[Tuple[str, str]]:
            images = s["data"]["images"]
            rows = [
                ("task", f"{kind} ({what}) on `{cfg.model.backbone}`, {s['params'] / 1e6:.2f}M parameters "
                         f"({s['backbone_params'] / 1e6:.2f}M backbone + FPN)"),
                ("data", f"Fashion-MNIST mosaics (not COCO), {cfg.data.canvas}x{cfg.data.canvas}, {images['train']} train / "
                         f"{images['val']} val / {images['test']} test, benchmark seed {cfg.data.seed}"),
                ("epochs / global batch / processes", f"{cfg.engine.epochs} / {cfg.engine.batch_size} / {s['processes']}"),
                (f"best val {label}", f"{s['best']['value']:.2f} (epoch {s['best']['epoch']}, {s['best']['source']} weights)"),
                (f"test {label} (best weights)", f"{s['test'][task.metric]:.2f}"),
            ]
            t = s["test"]
            if kind == "detect":
                rows.append(("test mAP@.5 / mAP@.75 / AR@100", f"{t['map_50']:.2f} / {t['map_75']:.2f} / {t['mar_100']:.2f}"))
                if "mask_map" in t:
                    rows.append(("test mask mAP / mask mAP@.5", f"{t['mask_map']:.2f} / {t['mask_map_50']:.2f}"))
            else:
                rows.append(("test pixel accuracy / loss", f"{t['pixel_acc']:.2f}% / {t['loss']:.4f}"))
            rows += [("wall time (train + val, this segment)", f"{s['wall_seconds'] / 60:.1f} min"),
                     ("training throughput", f"{s['train_images_per_s']:.1f} images/s"),
                     ("test throughput (with metric)", f"{s['test_images_per_s']:.1f} images/s")]
            return rows

        def headline(s: Dict[str, Any]) -> str:
            return (f"best val {task.metric} {s['best']['value']:.2f} (epoch {s['best']['epoch']}, {s['best']['source']}), "
                    f"test {task.metric} {s['test'][task.metric]:.2f}")

        return RunParts(model=model, task=task, train_set=datasets["train"], val_set=datasets["val"],
                        name=f"{kind} {what} on {cfg.model.backbone}", input_shape=tuple(datasets["train"][0][0].shape),
                        summary=dict(task=kind, model=what, backbone=cfg.model.backbone,
                                     backbone_params=sum(p.numel() for p in model.backbone.parameters()),
                                     data=describe(cfg.data)),
                        report_title=f"{kind.capitalize()} report", report_rows=report_rows, headline=headline,
                        finish=finish, figures=["Test mosaics: ![samples](samples.png)"])

    return build


def _default_name(kind: str) -> Callable[[Any], str]:
    return lambda cfg: f"{kind}-{cfg.model.backbone}"


def run_detection(cfg: DetectConfig, output_dir: Optional[str] = None, resume: Optional[str] = None) -> Dict[str, Any]:
    """Train a detector as ``cfg`` says on the Fashion-MNIST mosaics, then score the best validation
    weights on the test mosaics (box mAP). ``resume``: ``"auto"`` or a checkpoint folder (the run then
    continues with the config saved in ``output_dir``). Writes the run folder of ``sdt.engine`` plus
    summary.json, report.md, curves.png and samples.png; returns the summary."""
    return run_task(DetectConfig, cfg, output_dir, resume, _default_name("detect"), _builder("detect"))


def run_segmentation(cfg: SegmentConfig, output_dir: Optional[str] = None, resume: Optional[str] = None) -> Dict[str, Any]:
    """As ``run_detection``, for semantic segmentation (Semantic-FPN head, mIoU)."""
    return run_task(SegmentConfig, cfg, output_dir, resume, _default_name("segment"), _builder("segment"))
