"""Fashion-MNIST mosaics: a small, real-content detection and segmentation benchmark that runs here.

This is a mosaic benchmark, not COCO: each image is a black ``canvas`` x ``canvas`` square holding
``min_items..max_items`` Fashion-MNIST images, each scaled to a random side in ``[min_side, max_side]``
and placed at a random position where its box overlaps no earlier box by more than ``max_overlap``
(intersection over the smaller box). Everything a dense task needs comes from the items' own pixels:

- instance mask: the item's pixels brighter than ``threshold`` x its own maximum intensity (items
  pasted later occlude earlier ones; the occluded pixels leave the earlier item's mask);
- box: the tight box of the (visible) mask, xyxy in pixels with exclusive right/bottom edges;
- label: the Fashion-MNIST class + 1 (1..10; 0 is the background, torchvision's convention);
- semantic map: the label of the item owning each pixel, 0 elsewhere.

Splits follow Fashion-MNIST's: "train" and "val" mosaics are built from the training files' items
(``sdt.data.fashion_mnist``'s fixed held-out split of ``val_size`` images), "test" mosaics only from
the t10k items, so no test item is ever seen in training.

Generated deterministically on the fly: mosaic ``i`` of a split is a pure function of
(``seed``, split, ``i``) and the config (a numpy ``SeedSequence`` of the three), nothing is cached
on disk; the same index always gives the same image and targets, in any process or worker.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .images import FASHION_MNIST_CLASSES, fashion_mnist

__all__ = ["MosaicConfig", "FashionMosaics", "check_mosaic_config", "check_detection_target", "check_semantic_target",
           "MOSAIC_CLASSES", "IGNORE_INDEX"]

MOSAIC_CLASSES = ["background"] + list(FASHION_MNIST_CLASSES)
IGNORE_INDEX = 255  # semantic maps may mark pixels to ignore with this value
_SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class MosaicConfig:
    """The benchmark's shape; ``seed`` fixes the benchmark (not the training run)."""
    canvas: int = 128
    min_items: int = 2
    max_items: int = 5
    min_side: int = 24          # pasted side of an item (Fashion-MNIST's 28 x 28, rescaled), pixels
    max_side: int = 56
    max_overlap: float = 0.1    # box intersection / smaller box area, between any two items
    threshold: float = 0.2      # mask: pixel > threshold x the item's own maximum intensity
    train_images: int = 4000
    val_images: int = 500
    test_images: int = 1000
    seed: int = 0
    data_dir: Optional[str] = None   # default: /usr/share/datasets/fashion-mnist
    val_size: int = 5000             # Fashion-MNIST training images held out for the val mosaics
    workers: int = 0


def check_mosaic_config(cfg: MosaicConfig) -> None:
    """Every setting on its own and together (``DataError`` naming ``data.<key>``)."""
    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise DataError(f"data.{key} must be {rule}, got {getattr(cfg, key)!r}")

    require(cfg.canvas >= 16, "canvas", "at least 16 pixels")
    require(cfg.min_items >= 1, "min_items", "at least 1 (every mosaic holds an item)")
    require(cfg.max_items >= cfg.min_items, "max_items", f">= data.min_items ({cfg.min_items})")
    require(cfg.min_side >= 8, "min_side", "at least 8 pixels")
    require(cfg.max_side >= cfg.min_side, "max_side", f">= data.min_side ({cfg.min_side})")
    require(cfg.max_side <= cfg.canvas, "max_side", f"<= data.canvas ({cfg.canvas})")
    require(0 <= cfg.max_overlap < 1, "max_overlap", "in [0, 1)")
    require(0 < cfg.threshold < 1, "threshold", "in (0, 1)")
    for key in ("train_images", "val_images", "test_images"):
        require(getattr(cfg, key) >= 1, key, "at least 1")
    require(cfg.val_size >= 1, "val_size", "at least 1 (the val mosaics' items)")
    require(cfg.workers >= 0, "workers", ">= 0")


_POOLS: Dict[Tuple[Optional[str], str, int], Tuple[np.ndarray, np.ndarray]] = {}


def _item_pool(data_dir: Optional[str], split: str, val_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) of a split, read once per process."""
    key = (data_dir, split, val_size)
    if key not in _POOLS:
        data = fashion_mnist(data_dir, split, val_size)
        _POOLS[key] = (data.images, data.labels)
    return _POOLS[key]


def _intersection_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of xyxy boxes a and b over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h) / max(float(smaller), 1.0)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


class FashionMosaics(Dataset):
    """The mosaics of one split (see the module docstring).

    ``dataset[i]`` -> (image (1, canvas, canvas) float32 in [0, 1], i): the engine's ``collate`` stacks
    these; the targets of a batch are looked up by index with ``target(i)`` (mosaics are regenerated
    from (seed, split, i), so this costs a mosaic's generation, well under a millisecond's worth of work
    per item compared with a forward pass).

    ``sample(i)`` -> dict with ``image`` (1, H, W) float32, ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,)
    int64 in 1..10, ``masks`` (N, H, W) uint8, ``semantic`` (H, W) int64 in 0..10 and ``items`` (N,)
    int64 (the Fashion-MNIST indices used).
    """

    classes = MOSAIC_CLASSES
    num_classes = len(MOSAIC_CLASSES)  # background included

    def __init__(self, cfg: MosaicConfig, split: str):
        if split not in _SPLITS:
            raise DataError(f"split must be train, val or test, got {split!r}")
        check_mosaic_config(cfg)
        self.cfg, self.split = cfg, split
        self.length = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}[split]
        self.images, self.labels = _item_pool(cfg.data_dir, split, cfg.val_size)

    def __len__(self) -> int:
        return self.length

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"mosaic {index} out of range for the {self.length} {self.split} mosaics")

    def sample(self, index: int) -> Dict[str, Tensor]:
        self._check_index(index)
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, _SPLITS[self.split], index])
        size = cfg.canvas
        canvas = np.zeros((size, size), dtype=np.float32)
        owner = np.full((size, size), -1, dtype=np.int64)  # which placed item each pixel shows
        boxes: List[np.ndarray] = []
        items: List[int] = []
        for _ in range(int(rng.integers(cfg.min_items, cfg.max_items + 1))):
            item = int(rng.integers(len(self.images)))
            side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
            pixels = np.asarray(Image.fromarray(self.images[item]).resize((side, side), Image.BILINEAR),
                                dtype=np.float32) / 255.0
            mask = pixels > cfg.threshold * pixels.max()
            if not mask.any():
                continue
            local = _tight_box(mask)
            for _attempt in range(30):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = local + np.array([x, y, x, y], dtype=np.float32)
                if all(_intersection_fraction(box, other) <= cfg.max_overlap for other in boxes):
                    break
            else:
                continue  # no free spot: the mosaic gets one item fewer
            region = (slice(y, y + side), slice(x, x + side))
            canvas[region] = np.where(mask, pixels, np.maximum(canvas[region], pixels))
            owner[region] = np.where(mask, len(items), owner[region])
            boxes.append(box)
            items.append(item)
        masks = np.stack([owner == k for k in range(len(items))]).astype(np.uint8) if items else \
            np.zeros((0, size, size), np.uint8)
        keep = [k for k in range(len(items)) if masks[k].any()]  # an item occluded entirely is dropped
        masks = masks[keep]
        labels = np.array([self.labels[items[k]] + 1 for k in keep], dtype=np.int64)
        semantic = np.zeros((size, size), dtype=np.int64)
        for m, label in zip(masks, labels):
            semantic[m.astype(bool)] = label
        return {
            "image": torch.from_numpy(canvas).unsqueeze(0),
            "boxes": torch.from_numpy(np.stack([_tight_box(m) for m in masks]) if keep else np.zeros((0, 4), np.float32)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
            "semantic": torch.from_numpy(semantic),
            "items": torch.tensor([items[k] for k in keep], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.sample(index)["image"], index

    def target(self, index: int) -> Dict[str, Tensor]:
        """Targets of mosaic ``index``: ``boxes``, ``labels``, ``masks``, ``semantic`` (see ``sample``)."""
        s = self.sample(index)
        return {k: s[k] for k in ("boxes", "labels", "masks", "semantic")}


# ---------------------------------------------------------------------------------------------
# Target checks (any dataset feeding sdt's dense tasks goes through these)


def check_detection_target(target: Dict[str, Tensor], image_size: Tuple[int, int], num_classes: int,
                           where: str = "a sample", need_masks: bool = False) -> None:
    """A ``DataError`` naming the sample and the problem for a target torchvision's detectors would
    reject with a bare assertion, or silently mis-train on.

    ``target``: ``boxes`` (N, 4) float xyxy pixels, ``labels`` (N,) int in [1, num_classes) and, if
    ``need_masks`` (Mask R-CNN), ``masks`` (N, H, W) matching ``image_size`` (H, W).

    Documented behaviour, not an error: N = 0 (an image without boxes) is a background-only image,
    which torchvision's detectors train on (every anchor / proposal is a negative).
    """
    h, w = image_size
    boxes, labels = target.get("boxes"), target.get("labels")
    if boxes is None or labels is None:
        raise DataError(f"{where}: a detection target needs 'boxes' and 'labels', got keys {sorted(target)}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"{where}: boxes must be (N, 4) xyxy, got shape {tuple(boxes.shape)}")
    if labels.shape != (boxes.shape[0],):
        raise DataError(f"{where}: {boxes.shape[0]} boxes but labels of shape {tuple(labels.shape)}")
    if len(boxes):
        boxes = boxes.float()
        if not torch.isfinite(boxes).all():
            raise DataError(f"{where}: boxes hold NaN or infinite values")
        bad = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).flatten()
        if len(bad):
            raise DataError(f"{where}: box {bad[0].item()} {boxes[bad[0]].tolist()} is degenerate (x2 <= x1 or "
                            f"y2 <= y1; boxes are xyxy with x2 > x1, y2 > y1); {len(bad)} such box(es)")
        outside = torch.nonzero((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)).flatten()
        if len(outside):
            raise DataError(f"{where}: box {outside[0].item()} {boxes[outside[0]].tolist()} leaves the {h}x{w} image; "
                            f"clip boxes to [0, W] x [0, H]")
        if labels.dtype.is_floating_point or labels.min() < 1 or labels.max() >= num_classes:
            raise DataError(f"{where}: labels must be integers in [1, {num_classes - 1}] (0 is the background; "
                            f"num_classes={num_classes} counts it), got {labels.tolist()}")
    if need_masks:
        masks = target.get("masks")
        if masks is None:
            raise DataError(f"{where}: Mask R-CNN needs 'masks' (N, H, W) in each target")
        if masks.shape != (boxes.shape[0], h, w):
            raise DataError(f"{where}: masks have shape {tuple(masks.shape)} but the image is {h}x{w} with "
                            f"{boxes.shape[0]} boxes; expected ({boxes.shape[0]}, {h}, {w})")


def check_semantic_target(semantic: Tensor, image_size: Tuple[int, int], num_classes: int, where: str = "a sample") -> None:
    """A ``DataError`` unless ``semantic`` is an (H, W) integer map with values in [0, num_classes) or
    ``IGNORE_INDEX`` (255, pixels left out of the loss and the metric)."""
    if semantic.shape != tuple(image_size):
        raise DataError(f"{where}: the semantic map has shape {tuple(semantic.shape)} but the image is "
                        f"{image_size[0]}x{image_size[1]}; they must match")
    if semantic.dtype.is_floating_point:
        raise DataError(f"{where}: the semantic map must hold integer class ids, got {semantic.dtype}")
    valid = (semantic >= 0) & (semantic < num_classes) | (semantic == IGNORE_INDEX)
    if not valid.all():
        bad = semantic[~valid]
        raise DataError(f"{where}: semantic class ids must be in [0, {num_classes}) or {IGNORE_INDEX} (ignore); "
                        f"found {bad.unique()[:5].tolist()}")


def describe(cfg: MosaicConfig) -> Dict[str, Any]:
    """The benchmark's definition, for reports."""
    return {"canvas": cfg.canvas, "items": [cfg.min_items, cfg.max_items], "side": [cfg.min_side, cfg.max_side],
            "max_overlap": cfg.max_overlap, "threshold": cfg.threshold, "seed": cfg.seed,
            "images": {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}}
