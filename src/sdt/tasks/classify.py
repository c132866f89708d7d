"""Image classification on top of ``sdt.engine``: the config, the task (loss + metrics), the
``sdt train`` run (data checks, training, test evaluation, plots, report) and ``sdt eval``.

    cfg = load_config(TrainConfig, "quick", ["engine.epochs=1"])
    summary = train(cfg, output_dir="runs/quick")
    result = evaluate_checkpoint("runs/quick", split="test", input_size=32)
"""
import difflib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import models  # noqa: F401  (registers the models with timm)
from .checkpoints import atomic_write, is_hub_dir, load_hub_model, load_into, load_weights
from .config import ConfigError, load_config
from .data import (AugConfig, Batch, DataConfig, ImageSamples, build_transform, check_data_config, check_images,
                   raw_dataset, resolve_in_chans, resolve_num_classes, split_datasets)
from .engine import (DistInfo, EngineConfig, RunParts, Trainer, all_reduce_sum, check_engine_settings, eval_loader,
                     run_task, setup_distributed)
from .plots import plot_confusion

_logger = logging.getLogger("sdt")


@dataclass
class ModelConfig:
    name: str = "sdt_h_nano"                 # any timm model; sdt registers sdt_h_* and rmt_*
    num_classes: Optional[int] = None        # None: the dataset's class count
    in_chans: Optional[int] = None           # None: the dataset's channel count
    drop_path_rate: Optional[float] = None   # None: the model's default
    kwargs: Dict[str, Any] = field(default_factory=dict)  # more timm.create_model arguments


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# ---------------------------------------------------------------------------------------------
# Task


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


class ClassificationTask:
    """Cross-entropy with timm's Mixup/CutMix (SoftTargetCrossEntropy) or label smoothing."""
    metric = "top1"

    def __init__(self, num_classes: int, aug: AugConfig):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.num_classes = num_classes
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               label_smoothing=aug.smoothing, num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif aug.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(aug.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        images, targets = batch.images, batch.targets
        if self.mixup is not None:
            if len(images) % 2:  # Mixup pairs images; a batch shortened by a skipped image may be odd
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        return summarize(classification_counts(model, loader, self.num_classes, dist_info))


# ---------------------------------------------------------------------------------------------
# Building blocks shared by train and eval


def check_model_name(name: str) -> None:
    """A ``ConfigError`` for a model name timm does not know, suggesting the closest registered names.
    ``hf-hub:`` / ``local-dir:`` names are left to timm; a pretrained tag (``sdt_h_nano.fmnist``) is allowed."""
    if ":" in name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown model {name!r}; {hint}(`sdt models` lists this package's models, "
                      f"timm.list_models() every registered one)")


def check_model_config(cfg: ModelConfig) -> None:
    """The model section on its own, before any data is read (``ConfigError``)."""
    check_model_name(cfg.name)
    for key in ("num_classes", "in_chans"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.{key} must be at least 1, or null (the dataset's), got {value}")
    if cfg.drop_path_rate is not None and not 0 <= cfg.drop_path_rate < 1:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), or null (the model's default), got {cfg.drop_path_rate}")


def check_train_config(cfg: TrainConfig) -> None:
    """Every setting of a training config that can be checked without the data: ``ConfigError`` /
    ``DataError`` naming the key, before anything is read or written."""
    check_model_config(cfg.model)
    check_data_config(cfg.data, cfg.aug)
    check_engine_settings(cfg.engine)


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
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


def _datasets(cfg: TrainConfig, splits: List[str]) -> Dict[str, ImageSamples]:
    """The classification datasets of ``splits`` at ``cfg.data.input_size`` (training augmentation on "train")."""
    def transform(training: bool) -> Any:
        return build_transform(cfg.data, cfg.aug if training else None, cfg.model.in_chans)
    return split_datasets(cfg.data, splits, cfg.model.in_chans, transform, cfg.engine.seed)


def _test_split(cfg: DataConfig) -> str:
    """Fashion-MNIST has a test set; an image folder uses test/ if present, else val/."""
    if cfg.dataset == "folder" and not (Path(cfg.data_dir) / "test").is_dir():
        return "val"
    return "test"


# ---------------------------------------------------------------------------------------------
# sdt train


def train(cfg: Optional[TrainConfig] = None, output_dir: Optional[str] = None,
          resume: Optional[str] = None) -> Dict[str, Any]:
    """Train a classifier as ``cfg`` says, then evaluate the best weights on the test split.

    ``resume``: ``"auto"`` (the newest checkpoint of ``output_dir``) or a checkpoint folder; the run
    then continues with the config saved in ``output_dir`` (pass ``cfg=None``; see
    ``sdt.engine.resolve_run``). Returns the run summary (also in summary.json and report.md).
    """
    return run_task(TrainConfig, cfg, output_dir, resume, lambda c: c.model.name, build_classification)


def build_classification(cfg: TrainConfig, info: DistInfo) -> RunParts:
    """``run_task``'s builder for ``sdt train``: every check of the config, data and model (nothing
    is written), the model, task and datasets, and the test evaluation of the best weights at the end."""
    check_train_config(cfg)
    cfg.model.in_chans = resolve_in_chans(cfg)
    datasets = _datasets(cfg, ["train", "val"])
    cfg.model.num_classes = resolve_num_classes(cfg, datasets["train"].classes)
    torch.manual_seed(cfg.engine.seed)
    model = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
    for ds in datasets.values():
        check_images(ds, cfg.model.in_chans, cfg.model.num_classes, model_stride(model))
    size = cfg.data.input_size
    task = ClassificationTask(cfg.model.num_classes, cfg.aug)

    def finish(trainer: Trainer, summary: Dict[str, Any]) -> None:
        """The best validation weights on the held-out test split."""
        test_split = _test_split(cfg.data)
        test_set = _datasets(cfg, [test_split])[test_split]
        if info.distributed:
            dist.barrier()  # rank 0 has written best.safetensors
        best_path = trainer.output_dir / "best.safetensors"
        load_into(trainer.model, load_weights(best_path), best_path)
        counts = classification_counts(trainer.model, eval_loader(test_set, trainer.batch_size_per_rank, cfg.data.workers, info),
                                       cfg.model.num_classes, info)
        summary.update(test_split=test_split, test=summarize(counts),
                       test_images_per_s=counts["count"] / max(counts["forward_seconds"], 1e-9))

    def headline(s: Dict[str, Any]) -> str:
        return (f"best val top-1 {s['best']['value']:.2f}% (epoch {s['best']['epoch']}, {s['best']['source']}), "
                f"test top-1 {s['test']['top1']:.2f}%")

    return RunParts(
        model, task, datasets["train"], datasets["val"], cfg.model.name, (cfg.model.in_chans, size, size),
        summary=dict(model=cfg.model.name), report_title="Training report", report_rows=lambda s: report_rows(s, cfg), headline=headline, finish=finish)


def report_rows(s: Dict[str, Any], cfg: TrainConfig) -> List[Tuple[str, str]]:
    """The rows of a classification run's report.md."""
    final = s["final_val"]
    rows = [
        ("model", f"`{s['model']}` ({s['params'] / 1e6:.2f}M parameters, {s['flops'] / 1e6:.1f} MMACs at {s['input_size']}x{s['input_size']})"),
        ("data", f"{cfg.data.dataset} {cfg.data.data_dir or ''}".strip()),
        ("epochs / global batch / processes", f"{cfg.engine.epochs} / {cfg.engine.batch_size} / {s['processes']}"),
        ("final val top-1 (model)", f"{final['top1']:.2f}%"),
    ]
    if "ema_top1" in final:
        rows.append(("final val top-1 (EMA)", f"{final['ema_top1']:.2f}%"))
    return rows + [
        ("best val top-1", f"{s['best']['value']:.2f}% (epoch {s['best']['epoch']}, {s['best']['source']} weights)"),
        (f"{s['test_split']} top-1 / top-5 / loss (best weights)", f"{s['test']['top1']:.2f}% / {s['test']['top5']:.2f}% / {s['test']['loss']:.4f}"),
        ("wall time (train + val, this segment)", f"{s['wall_seconds'] / 60:.1f} min"),
        ("training throughput", f"{s['train_images_per_s']:.0f} images/s"),
        ("inference throughput", f"{s['test_images_per_s']:.0f} images/s"),
    ]


# ---------------------------------------------------------------------------------------------
# sdt eval


def _run_dir_of(checkpoint: Path) -> Optional[Path]:
    for candidate in (checkpoint, checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def evaluate_checkpoint(checkpoint: str, model: Optional[str] = None, dataset: Optional[str] = None,
                        data_dir: Optional[str] = None,
                        split: str = "test", input_size: Optional[int] = None, batch_size: int = 256,
                        output_dir: Optional[str] = None, use_ema: bool = False) -> Dict[str, Any]:
    """Top-1/top-5/loss, per-class accuracy, confusion-matrix PNG and throughput of a checkpoint.

    ``checkpoint``: a run folder (its best.safetensors), a checkpoint folder (its model or EMA
    weights), a .safetensors file, or a folder in timm's hub layout (``sdt export-hub``; its
    config.json gives the model, preprocessing and label names, the data comes from ``dataset`` /
    ``data_dir``). Model and data default to the run's config.yaml when there is one; ``input_size``
    may differ from training (the models accept any resolution).
    """
    path = Path(checkpoint)
    if is_hub_dir(path):
        if model is not None or use_ema:
            raise ConfigError(f"{checkpoint} is a hub folder: its config.json names the model and it holds one set of "
                              f"weights; drop --model / --ema")
        cfg, net, test_set, classes = _hub_eval_setup(path, dataset, data_dir, split, input_size)
        default_out = path.parent / f"{path.name}-eval-{split}-{cfg.data.input_size}px"  # not inside the folder one uploads
    else:
        run_dir = _run_dir_of(path)
        cfg = load_config(TrainConfig, str(run_dir / "config.yaml")) if run_dir else TrainConfig()
        if path.is_dir():
            path = path / ("best.safetensors" if (path / "best.safetensors").is_file() else
                           "ema.safetensors" if use_ema else "model.safetensors")
        if model is not None:
            cfg.model.name = model
        if dataset is not None:
            cfg.data.dataset = dataset
        if data_dir is not None:
            cfg.data.data_dir = data_dir
        if run_dir is None and model is None:
            raise ConfigError(f"{checkpoint} is not inside a training run (no config.yaml); pass --model")
        weights = load_weights(path)
        cfg.data.input_size = input_size or cfg.data.input_size
        cfg.model.in_chans = resolve_in_chans(cfg)
        test_set = _datasets(cfg, [split])[split]
        cfg.model.num_classes = resolve_num_classes(cfg, test_set.classes)
        net = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
        load_into(net, weights, path)
        classes = test_set.classes
        default_out = (run_dir or path.parent) / f"eval-{split}-{cfg.data.input_size}px"
    info = setup_distributed("auto")
    net = net.to(info.device)
    size, num_classes = cfg.data.input_size, cfg.model.num_classes
    check_images(test_set, cfg.model.in_chans, num_classes, model_stride(net))
    counts = classification_counts(net, eval_loader(test_set, batch_size, cfg.data.workers, info), num_classes, info)
    confusion = counts["confusion"]
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).mul(100).tolist()
    result = {"checkpoint": str(path), "model": cfg.model.name, "split": split, "input_size": size,
              **summarize(counts), "images": counts["count"], "skipped": counts["skipped"],
              "images_per_s": counts["count"] / max(counts["forward_seconds"], 1e-9), "batch_size": batch_size,
              "per_class": dict(zip(classes, per_class)), "confusion": confusion.tolist()}
    if info.is_main:
        out = Path(output_dir) if output_dir else default_out
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "eval.json", json.dumps(result, indent=2))
        plot_confusion(confusion, classes, out / "confusion.png", f"{cfg.model.name} {split} @{size}px")
        result["output_dir"] = str(out)
    return result


def _hub_eval_setup(path: Path, dataset: Optional[str], data_dir: Optional[str], split: str,
                    input_size: Optional[int]) -> Tuple[TrainConfig, nn.Module, ImageSamples, List[str]]:
    """The model of a hub folder with the evaluation transform its pretrained_cfg describes
    (``timm.data.create_transform``), the ``split`` it is evaluated on and its label names."""
    from timm.data import create_transform

    net, data_config = load_hub_model(path)
    cfg = TrainConfig()
    cfg.model.name = net.pretrained_cfg.get("architecture", type(net).__name__)
    cfg.model.in_chans, cfg.model.num_classes = data_config["input_size"][0], net.num_classes
    cfg.data.input_size = input_size or data_config["input_size"][-1]
    if dataset is not None:
        cfg.data.dataset = dataset
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    check_data_config(cfg.data)
    resolve_in_chans(cfg)  # the data's channels must be the model's
    data_config = dict(data_config, input_size=(cfg.model.in_chans, cfg.data.input_size, cfg.data.input_size))
    test_set = ImageSamples(raw_dataset(cfg.data, split, cfg.model.in_chans), create_transform(**data_config),
                            strict=cfg.data.strict_images)
    resolve_num_classes(cfg, test_set.classes)  # the data's classes must fit the head
    labels = net.pretrained_cfg.get("label_names")
    return cfg, net, test_set, list(labels) if labels else list(test_set.classes)


def format_eval(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['split']} at {result['input_size']}px ({result['images']} images, "
             f"{result['skipped']} skipped): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
             f"loss {result['loss']:.4f}  {result['images_per_s']:.0f} images/s (batch {result['batch_size']})",
             "", "| class | accuracy |", "|---|---:|"]
    lines += [f"| {name} | {acc:.2f}% |" for name, acc in result["per_class"].items()]
    if "output_dir" in result:
        lines += ["", f"written: {result['output_dir']}/eval.json, confusion.png"]
    return "\n".join(lines)
