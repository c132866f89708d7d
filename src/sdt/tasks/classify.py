"""Image classification: the config, the task (cross-entropy with Mixup/CutMix or label smoothing;
top-1/top-5/loss) and the pieces ``sdt eval`` shares with it (``create_model``, ``classification_counts``).

    cfg = load_config(TrainConfig, "quick", ["engine.epochs=1"])
    summary = Classify().train(cfg, output_dir="runs/quick")
"""
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..attention import GateDrift
from ..data import (AugConfig, Batch, DataConfig, ImageSamples, build_transform, check_data_config, check_images,
                    resolve_in_chans, resolve_num_classes, split_datasets)
from ..engine import Built, DistInfo, EngineConfig, all_reduce_sum
from ..errors import ConfigError
from ..models.registry import check_model_name
from .base import Rows, Task
from .pretrained import load_initial_checkpoint


@dataclass
class ModelConfig:
    name: str = "sdt_h_nano"                 # any timm model; sdt registers sdt_h_* and rmt_*
    num_classes: Optional[int] = None        # None: the dataset's class count
    in_chans: Optional[int] = None           # None: the dataset's channel count
    drop_path_rate: Optional[float] = None   # None: the model's default
    kwargs: Dict[str, Any] = field(default_factory=dict)  # more timm.create_model arguments
    # weights to fine-tune from (tasks/pretrained.py): a weights file, run, hub folder or shipped tag;
    # a head with other classes is reset, a stem with other channels adapted
    initial_checkpoint: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@torch.no_grad()
def classification_counts(model: nn.Module, loader: DataLoader, num_classes: int, dist_info: DistInfo) -> Dict[str, Any]:
    """Confusion matrix (K, K) [true, predicted], top-5 hits, summed cross-entropy, image count and
    forward-pass seconds over ``loader``, summed across processes.

    Ours, not torchmetrics' ``MulticlassConfusionMatrix``: torchmetrics is only an extra (``fid``), and
    the confusion matrix is one ``bincount`` summed in the same all-reduce as the other counts."""
    was_training = model.training
    model.eval()
    device = dist_info.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-5 hits, loss sum, skipped
    forward_seconds = 0.0
    for batch in loader:
        sums[2] += batch.skipped
        if len(batch.images) == 0:
            continue
        images, targets = batch.images.to(device), batch.targets.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(images).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_seconds += time.perf_counter() - start
        confusion += torch.bincount(targets * num_classes + logits.argmax(1), minlength=num_classes ** 2).view(num_classes, num_classes)
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        sums[0] += (top5 == targets[:, None]).any(1).sum()
        sums[1] += F.cross_entropy(logits, targets, reduction="sum")
    all_reduce_sum(confusion, dist_info)
    all_reduce_sum(sums, dist_info)
    model.train(was_training)
    return {"confusion": confusion.cpu(), "top5_hits": sums[0].item(), "loss_sum": sums[1].item(),
            "skipped": int(sums[2].item()), "count": int(confusion.sum()), "forward_seconds": forward_seconds}


def summarize(counts: Dict[str, Any]) -> Dict[str, float]:
    """top1 / top5 in percent and mean loss from ``classification_counts``."""
    n = max(counts["count"], 1)
    return {"top1": 100.0 * counts["confusion"].diag().sum().item() / n, "top5": 100.0 * counts["top5_hits"] / n,
            "loss": counts["loss_sum"] / n}


def check_model_config(cfg: ModelConfig) -> None:
    """The model section on its own, before any data is read (``ConfigError``)."""
    check_model_name(cfg.name)
    for key in ("num_classes", "in_chans"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.{key} must be at least 1, or null (the dataset's), got {value}")
    if cfg.drop_path_rate is not None and not 0 <= cfg.drop_path_rate < 1:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), or null (the model's default), got {cfg.drop_path_rate}")


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The timm model of ``cfg`` (a ``ConfigError`` for arguments it refuses)."""
    check_model_name(cfg.name)
    kwargs = dict(cfg.kwargs)
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        return timm.create_model(cfg.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ConfigError(f"model.kwargs {cfg.kwargs} do not fit {cfg.name}: {e}") from e
        raise
    except ValueError as e:  # the model refuses an argument value (e.g. an unknown decay variant)
        raise ConfigError(f"{cfg.name} with model.kwargs {cfg.kwargs}: {e}") from e


def model_stride(model: nn.Module) -> int:
    """Total downsampling of the model (the smallest image side it accepts)."""
    info = getattr(model, "feature_info", None)
    return info[-1]["reduction"] if info else 1


def classification_datasets(cfg: TrainConfig, splits: Sequence[str], in_chans: int) -> Dict[str, ImageSamples]:
    """The classification datasets of ``splits`` at ``cfg.data.input_size`` (training augmentation on "train")."""
    def transform(training: bool) -> Any:
        return build_transform(cfg.data, cfg.aug if training else None, in_chans)
    return split_datasets(cfg.data, splits, in_chans, transform, cfg.engine.seed)


def test_split(cfg: DataConfig) -> str:
    """Fashion-MNIST has a test set; an image folder uses test/ if present, else val/."""
    if cfg.dataset == "folder" and not (Path(cfg.data_dir) / "test").is_dir():
        return "val"
    return "test"


def classification_loss(num_classes: int, aug: AugConfig) -> Tuple[Optional[Any], nn.Module]:
    """timm's Mixup/CutMix (with SoftTargetCrossEntropy), label smoothing, or plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      label_smoothing=aug.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else nn.CrossEntropyLoss()


class Classify(Task):
    """Train an image classifier (``sdt train``); score the best weights on the test split."""
    config_class = TrainConfig
    metric = "top1"

    def build(self, cfg: TrainConfig, dist_info: DistInfo) -> Built:
        """Every check of the config, data and model (nothing is written), then the parts of the run."""
        check_model_config(cfg.model)
        check_data_config(cfg.data, cfg.aug)
        in_chans = resolve_in_chans(cfg.data, cfg.model.in_chans)
        datasets = classification_datasets(cfg, ["train", "val"], in_chans)
        num_classes = resolve_num_classes(cfg.model.num_classes, datasets["train"].classes)
        self.cfg = replace(cfg, model=replace(cfg.model, in_chans=in_chans, num_classes=num_classes))
        self.dist, self.num_classes = dist_info, num_classes
        torch.manual_seed(cfg.engine.seed)
        model = create_model(cfg.model, num_classes, in_chans)
        summary = dict(model=cfg.model.name)
        if cfg.model.initial_checkpoint and self.resuming:  # the checkpoint holds the weights; the file may be gone
            summary["initial_weights"] = f"initial weights from {cfg.model.initial_checkpoint} (at the run's start)"
        elif cfg.model.initial_checkpoint:
            summary["initial_weights"] = load_initial_checkpoint(model, cfg.model.initial_checkpoint)
            if dist_info.is_main:  # before the run's log starts (nothing is written before every check passed)
                print(f"sdt: {summary['initial_weights']}", file=sys.stderr)
        for ds in datasets.values():
            check_images(ds, in_chans, num_classes, model_stride(model))
        self.mixup, self.criterion = classification_loss(num_classes, cfg.aug)
        size = cfg.data.input_size
        return Built(self.cfg, model, datasets["train"], datasets["val"], cfg.model.name, cfg.data.dataset,
                     (in_chans, size, size), summary=summary, workers=cfg.data.workers,
                     repeated_aug=cfg.data.repeated_aug)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        images, targets = batch.images, batch.targets
        if self.mixup is not None:
            if len(images) % 2:  # Mixup pairs images; a batch shortened by a skipped image may be odd
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        """top1 / top5 / loss, and for a model with learned decay how far its rates moved (``GateDrift``)."""
        with GateDrift(model) as drift:
            counts = classification_counts(model, loader, self.num_classes, dist_info)
        if drift.gates:
            all_reduce_sum(drift.sums, dist_info)
        return {**summarize(counts), **drift.metrics()}

    def test_set(self) -> ImageSamples:
        split = test_split(self.cfg.data)
        return classification_datasets(self.cfg, [split], self.cfg.model.in_chans)[split]

    def evaluate_test(self, model: nn.Module, loader: DataLoader) -> Dict[str, Any]:
        """Top-1/top-5/loss on the test split; throughput of the forward passes alone."""
        counts = classification_counts(model, loader, self.num_classes, self.dist)
        return {"test_split": test_split(self.cfg.data), "test": summarize(counts),
                "test_images_per_s": counts["count"] / max(counts["forward_seconds"], 1e-9)}

    def headline(self, s: Dict[str, Any]) -> str:
        return (f"best val top-1 {s['best']['value']:.2f}% (epoch {s['best']['epoch']}, {s['best']['source']}), "
                f"test top-1 {s['test']['top1']:.2f}%")

    def report_rows(self, s: Dict[str, Any]) -> Rows:
        final, test, data = s["final_val"], s["test"], self.cfg.data
        rows = [
            ("model", f"`{s['model']}` ({s['params'] / 1e6:.2f}M parameters, {s['flops'] / 1e6:.1f} MMACs at "
                      f"{s['input_size']}x{s['input_size']})"),
            *([("initial weights", s["initial_weights"])] if "initial_weights" in s else []),
            ("data", f"{data.dataset} {data.data_dir or ''}".strip()),
            self.schedule_row(s),
            ("final val top-1 (model)", f"{final['top1']:.2f}%"),
        ]
        if "ema_top1" in final:
            rows.append(("final val top-1 (EMA)", f"{final['ema_top1']:.2f}%"))
        return rows + [
            self.best_row(s, "top-1", unit="%"),
            (f"{s['test_split']} top-1 / top-5 / loss (best weights)", f"{test['top1']:.2f}% / {test['top5']:.2f}% / {test['loss']:.4f}"),
            *self.timing_rows(s),
            ("inference throughput", f"{s['test_images_per_s']:.0f} images/s"),
        ]
