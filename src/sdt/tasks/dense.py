"""Detection and semantic segmentation on the Fashion-MNIST mosaics: the backbone config and the
``DenseTask`` base that ``Detect`` and ``Segment`` share (build, target checks, test, sample
drawings, report). ``sdt detect`` / ``sdt segment`` run them.

    cfg = load_config(DetectConfig, "detect-mosaic", ["engine.epochs=1"])
    summary = Detect().train(cfg, output_dir="runs/detect")

Data: ``sdt.data.FashionMosaics`` (a mosaic benchmark built from Fashion-MNIST, not COCO). How
targets reach the loss: the engine's loader stacks ``(image, index)`` pairs with ``sdt.data.collate``,
so a batch's ``targets`` are the mosaics' indices, and the task looks each target up with
``dataset.target(index)`` (mosaics are pure functions of their index). Any dataset with that
``__getitem__ -> (image, index)`` / ``target(index) -> dict`` pair works; every target goes
through ``sdt.data.check_detection_target`` / ``check_semantic_target``.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import MOSAIC_CLASSES, FashionMosaics, check_mosaic_config, describe
from ..engine import Built, DistInfo, Trainer
from ..errors import CheckpointError, ConfigError, DataError
from ..files import atomic_path
from ..models.dense import create_backbone
from .base import Rows, Task
from .pretrained import weights_file


@dataclass
class BackboneConfig:
    RENAMED_KEYS = {"pretrained": "initial_checkpoint"}  # runs and recipes from before the key had sdt train's name
    backbone: str = "sdt_h_nano"                 # sdt_h_*, rmt_*, *_full2d, any timm features_only model, tv_resnet18
    out_indices: Optional[Tuple[int, ...]] = None  # feature levels into the FPN (None: all)
    fpn_channels: int = 64
    # classification weights to start the backbone from: a run, hub or checkpoint folder, a .safetensors or RMT's
    # .pth, or a shipped tag such as sdt_h_nano.fmnist_e30 (the head is dropped); the train command's key too
    initial_checkpoint: Optional[str] = None
    frozen_stages: int = -1                      # -1 none, 0 stem, n stem + first n stages
    norm_eval: bool = False                      # norm layers of the backbone in eval mode, frozen
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model arguments (e.g. stem_stride: 4)


def check_backbone_config(cfg: BackboneConfig) -> None:
    """The model section on its own (``ConfigError``)."""
    if cfg.fpn_channels < 1:
        raise ConfigError(f"model.fpn_channels must be at least 1, got {cfg.fpn_channels}")
    if cfg.frozen_stages < -1:
        raise ConfigError(f"model.frozen_stages must be -1 (nothing frozen) or more, got {cfg.frozen_stages}")
    if cfg.initial_checkpoint is not None:
        try:
            weights_file(cfg.initial_checkpoint)
        except CheckpointError as e:
            raise ConfigError(f"model.initial_checkpoint: {e}") from None


def build_backbone(cfg: BackboneConfig, extra_blocks: str = "none") -> nn.Module:
    """The backbone + FPN of ``cfg`` for the grayscale mosaics."""
    return create_backbone(cfg.backbone, in_chans=1, out_indices=cfg.out_indices, fpn_channels=cfg.fpn_channels,
                           extra_blocks=extra_blocks, frozen_stages=cfg.frozen_stages,
                           pretrained=None if cfg.initial_checkpoint is None else str(weights_file(cfg.initial_checkpoint)),
                           norm_eval=cfg.norm_eval, model_kwargs=cfg.kwargs)


def _targets_of(dataset: Dataset, indices: Tensor) -> List[Dict[str, Tensor]]:
    if not hasattr(dataset, "target"):
        raise DataError(f"{type(dataset).__name__} has no target(index) method; dense tasks need datasets that "
                        f"return (image, index) and give each index's targets (see sdt.data.FashionMosaics)")
    return [dataset.target(int(i)) for i in indices.tolist()]


class DenseTask(Task):
    """A dense task on the mosaics. Subclasses set ``kind`` ("detect" / "segment") and ``label`` (the
    metric as the report names it) and implement ``build_model``, ``model_label``, ``targets`` (checked
    targets of a batch), ``loss``, ``evaluate``, ``draw`` (samples.png) and ``test_rows``."""
    kind: str
    label: str
    figures = ("Test mosaics: ![samples](samples.png)",)

    def __init__(self, train_set: Optional[Dataset] = None, num_classes: int = len(MOSAIC_CLASSES)):
        """``train_set`` (the dataset ``loss`` looks targets up in) and ``num_classes`` (with the
        background) serve a task used outside a run; ``build`` sets them for a run."""
        super().__init__()
        self.train_set, self.num_classes = train_set, num_classes

    def run_name(self, cfg: Any) -> str:
        return f"{self.kind}-{cfg.model.backbone}"

    def build_model(self, cfg: Any) -> nn.Module:
        raise NotImplementedError

    def model_label(self, cfg: Any) -> str:
        raise NotImplementedError

    def targets(self, dataset: Dataset, indices: Tensor, image_size: Tuple[int, int], device: torch.device) -> Any:
        raise NotImplementedError

    def draw(self, model: nn.Module, dataset: FashionMosaics, indices: List[int], path: Path) -> None:
        raise NotImplementedError

    def test_rows(self, test: Dict[str, float]) -> Rows:
        raise NotImplementedError

    def build(self, cfg: Any, dist_info: DistInfo) -> Built:
        """Every check on config, data and model (nothing is written yet), then the parts of the run."""
        check_backbone_config(cfg.model)
        check_mosaic_config(cfg.data)
        datasets = {split: FashionMosaics(cfg.data, split) for split in ("train", "val")}
        self.cfg, self.dist, self.train_set = cfg, dist_info, datasets["train"]
        self.num_classes = FashionMosaics.num_classes
        torch.manual_seed(cfg.engine.seed)
        # a resumed run's checkpoint holds the weights: the initial ones are not read (the file may be gone)
        model = self.build_model(replace(cfg, model=replace(cfg.model, initial_checkpoint=None)) if self.resuming else cfg)
        stride = model.backbone.stride
        if cfg.data.canvas % stride:
            raise ConfigError(f"data.canvas={cfg.data.canvas} must be a multiple of the backbone's stride {stride}")
        for ds in datasets.values():  # generate and check the first mosaics' targets before anything is written
            self.targets(ds, torch.arange(min(len(ds), 4)), (cfg.data.canvas, cfg.data.canvas), torch.device("cpu"))
        what = self.model_label(cfg)
        return Built(cfg, model, datasets["train"], datasets["val"], f"{self.kind} {what} on {cfg.model.backbone}",
                     type(datasets["train"]).__name__, tuple(datasets["train"][0][0].shape),
                     summary=dict(task=self.kind, model=what, backbone=cfg.model.backbone,
                                  backbone_params=sum(p.numel() for p in model.backbone.parameters()),
                                  data=describe(cfg.data)), workers=cfg.data.workers)

    def test_set(self) -> FashionMosaics:
        self.test_mosaics = FashionMosaics(self.cfg.data, "test")
        return self.test_mosaics

    def finish(self, trainer: Trainer, summary: Dict[str, Any]) -> None:
        """The test of the best weights, then samples.png of the first test mosaics (main process)."""
        self.test_best(trainer, summary)
        if self.dist.is_main:
            samples = list(range(min(8, len(self.test_mosaics))))
            self.draw(trainer.model, self.test_mosaics, samples, trainer.output_dir / "samples.png")

    def report_rows(self, s: Dict[str, Any]) -> Rows:
        images, cfg = s["data"]["images"], self.cfg
        return [
            ("task", f"{self.kind} ({s['model']}) on `{cfg.model.backbone}`, {s['params'] / 1e6:.2f}M parameters "
                     f"({s['backbone_params'] / 1e6:.2f}M backbone + FPN)"),
            ("data", f"Fashion-MNIST mosaics (not COCO), {cfg.data.canvas}x{cfg.data.canvas}, {images['train']} train / "
                     f"{images['val']} val / {images['test']} test, benchmark seed {cfg.data.seed}"),
            self.schedule_row(s),
            self.best_row(s, self.label),
            (f"test {self.label} (best weights)", f"{s['test'][self.metric]:.2f}"),
            *self.test_rows(s["test"]),
            *self.timing_rows(s, digits=1),
            ("test throughput (with metric)", f"{s['test_images_per_s']:.1f} images/s"),
        ]


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
