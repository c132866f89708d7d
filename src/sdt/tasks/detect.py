"""Object detection on the mosaics: torchvision's Faster/Mask R-CNN, RetinaNet or FCOS on an sdt
backbone + FPN, the sum of the detector's losses, COCO box mAP (and mask mAP for Mask R-CNN) from
torchmetrics' ``MeanAveragePrecision`` (backend faster-coco-eval, or pycocotools when only that is
installed), all in percent. ``sdt detect`` runs it.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import MOSAIC_CLASSES, Batch, FashionMosaics, MosaicConfig, check_detection_target
from ..engine import DistInfo, EngineConfig
from ..errors import ConfigError, require_extra
from ..models.dense import create_detector
from .base import Rows
from .dense import BackboneConfig, DenseTask, _palette, _save_grid, _targets_of, _to_rgb, build_backbone


@dataclass
class DetectModelConfig(BackboneConfig):
    extra_blocks: str = "maxpool"                # FPN levels beyond the backbone's: maxpool, p6p7 or none
    detector: str = "fasterrcnn"                 # fasterrcnn, maskrcnn, retinanet, fcos
    detector_kwargs: Dict[str, Any] = field(default_factory=dict)  # torchvision detector arguments
    score_thresh: float = 0.5                    # drawings only: detections at least this confident


@dataclass
class DetectConfig:
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: MosaicConfig = field(default_factory=MosaicConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def build_detector(cfg: DetectModelConfig, canvas: int, num_classes: int = len(MOSAIC_CLASSES)) -> nn.Module:
    """The torchvision detector of ``cfg`` for ``canvas``-pixel mosaics (``num_classes`` with background)."""
    try:
        return create_detector(cfg.detector, build_backbone(cfg, cfg.extra_blocks), num_classes, canvas, **cfg.detector_kwargs)
    except TypeError as e:
        raise ConfigError(f"model.detector_kwargs {cfg.detector_kwargs} do not fit {cfg.detector}: {e}") from e


def coco_backend() -> str:
    """The COCO evaluator torchmetrics' ``MeanAveragePrecision`` will use: faster_coco_eval if installed,
    else pycocotools; a ``MissingExtraError`` naming the install command when neither is."""
    import importlib.util

    require_extra("torchmetrics", "dense", "box mAP")
    for module in ("faster_coco_eval", "pycocotools"):
        if importlib.util.find_spec(module) is not None:
            return module
    require_extra("faster_coco_eval", "dense", "box mAP (a COCO evaluator: faster-coco-eval or pycocotools)")
    return "faster_coco_eval"


class Detect(DenseTask):
    """Train a detector on the mosaics (``sdt detect``).

    ``loss``: batch images (B, C, H, W), batch targets (B,) mosaic indices into the training set.
    ``evaluate`` -> ``{"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"}``
    in percent (``mask_map`` / ``mask_map_50`` too for Mask R-CNN; a size class absent from the ground truth
    is left out), gathered over processes by torchmetrics.
    """
    config_class = DetectConfig
    kind, label, report_title = "detect", "box mAP@[.5:.95]", "Detect report"
    metric = "map"
    KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")

    def __init__(self, train_set: Optional[Dataset] = None, num_classes: int = len(MOSAIC_CLASSES), masks: bool = False):
        """``masks``: score masks too (Mask R-CNN); ``build`` sets it from the config for a run."""
        super().__init__(train_set, num_classes)
        self.masks, self.backend = masks, coco_backend()

    def build_model(self, cfg: DetectConfig) -> nn.Module:
        self.masks = cfg.model.detector == "maskrcnn"
        return build_detector(cfg.model, cfg.data.canvas, self.num_classes)

    def model_label(self, cfg: DetectConfig) -> str:
        return cfg.model.detector

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

    def test_rows(self, test: Dict[str, float]) -> Rows:
        rows = [("test mAP@.5 / mAP@.75 / AR@100", f"{test['map_50']:.2f} / {test['map_75']:.2f} / {test['mar_100']:.2f}")]
        if "mask_map" in test:
            rows.append(("test mask mAP / mask mAP@.5", f"{test['mask_map']:.2f} / {test['mask_map_50']:.2f}"))
        return rows

    def draw(self, model: nn.Module, dataset: FashionMosaics, indices: List[int], path: Path) -> None:
        draw_detections(model, dataset, indices, path, self.cfg.model.score_thresh)


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
