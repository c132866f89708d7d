"""Semantic segmentation on the mosaics: a Semantic-FPN head on an sdt backbone + FPN, per-pixel
cross-entropy (``IGNORE_INDEX`` pixels left out), mIoU over the 11 classes (background included, as
ADE20K's mIoU counts every class), pixel accuracy and loss. ``sdt segment`` runs it.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import IGNORE_INDEX, MOSAIC_CLASSES, Batch, FashionMosaics, MosaicConfig, check_semantic_target
from ..engine import DistInfo, EngineConfig
from ..errors import DataError, require_extra
from ..models.dense import create_segmenter
from .base import Rows
from .dense import BackboneConfig, DenseTask, _palette, _save_grid, _targets_of, _to_rgb, build_backbone


@dataclass
class SegmentModelConfig(BackboneConfig):
    DROPPED_KEYS = {"extra_blocks": "the Semantic-FPN head uses the backbone's levels only"}
    head_channels: int = 64                      # Semantic-FPN head width


@dataclass
class SegmentConfig:
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: MosaicConfig = field(default_factory=MosaicConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def build_segmenter(cfg: SegmentModelConfig, num_classes: int = len(MOSAIC_CLASSES)) -> nn.Module:
    return create_segmenter(build_backbone(cfg), num_classes, cfg.head_channels)


class Segment(DenseTask):
    """Train a Semantic-FPN segmenter on the mosaics (``sdt segment``).

    ``loss``: batch images (B, C, H, W), batch targets (B,) indices; semantic maps (B, H, W).
    ``evaluate`` -> ``{"miou", "pixel_acc", "loss"}`` (percent, percent, mean per pixel), reduced over
    processes; ``per_class=True`` adds ``iou_<class>`` for each class.
    """
    config_class = SegmentConfig
    kind, label, report_title = "segment", "mIoU", "Segment report"
    metric = "miou"
    class_names = MOSAIC_CLASSES

    def build_model(self, cfg: SegmentConfig) -> nn.Module:
        require_extra("torchmetrics", "dense", "mIoU")  # before the run starts, not at the first evaluation
        return build_segmenter(cfg.model, self.num_classes)

    def model_label(self, cfg: SegmentConfig) -> str:
        return "semantic-fpn"

    def targets(self, dataset: Dataset, indices: Tensor, image_size: Tuple[int, int], device: torch.device) -> Tensor:
        maps = []
        for i, t in zip(indices.tolist(), _targets_of(dataset, indices)):
            if "semantic" not in t:
                raise DataError(f"{type(dataset).__name__}[{i}]: a segmentation target needs 'semantic' (H, W)")
            check_semantic_target(t["semantic"], image_size, self.num_classes, where=f"{type(dataset).__name__}[{i}]")
            maps.append(t["semantic"].long())
        return torch.stack(maps).to(device)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        images = batch.images
        target = self.targets(self.train_set, batch.targets, tuple(images.shape[-2:]), images.device)
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
            target = self.targets(loader.dataset, batch.targets, tuple(images.shape[-2:]), device)
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

    def test_metrics(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]:
        return self.evaluate(model, loader, self.dist, per_class=True)

    def test_rows(self, test: Dict[str, float]) -> Rows:
        return [("test pixel accuracy / loss", f"{test['pixel_acc']:.2f}% / {test['loss']:.4f}")]

    def draw(self, model: nn.Module, dataset: FashionMosaics, indices: List[int], path: Path) -> None:
        draw_segmentations(model, dataset, indices, path)


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
