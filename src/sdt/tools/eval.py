"""``sdt eval``: top-1/top-5/loss, per-class accuracy, confusion matrix and throughput of a
classifier's checkpoint: a run folder, a checkpoint folder, a weights file or a hub folder.

    result = evaluate_checkpoint("runs/quick", split="test", input_size=32)
    print(format_eval(result))
"""
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
from torch import nn

from ..data import ImageSamples, check_data_config, check_images, raw_dataset, resolve_in_chans, resolve_num_classes
from ..engine import eval_loader, load_config, setup_distributed
from ..engine.plots import plot_confusion
from ..errors import ConfigError
from ..files import atomic_write, is_hub_dir, load_hub_model, load_into, load_weights
from ..tasks.classify import (TrainConfig, classification_counts, classification_datasets, create_model, model_stride,
                              summarize)


def _run_dir_of(checkpoint: Path) -> Optional[Path]:
    for candidate in (checkpoint, checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def evaluate_checkpoint(checkpoint: str, model: Optional[str] = None, dataset: Optional[str] = None,
                        data_dir: Optional[str] = None,
                        split: str = "test", input_size: Optional[int] = None, batch_size: int = 256,
                        output_dir: Optional[str] = None, use_ema: bool = False,
                        crop_pct: Optional[float] = None, in_chans: Optional[int] = None) -> Dict[str, Any]:
    """Top-1/top-5/loss, per-class accuracy, confusion-matrix PNG and throughput of a checkpoint.

    ``checkpoint``: a run folder (its best.safetensors), a checkpoint folder (its model or EMA
    weights), a .safetensors file, or a folder in timm's hub layout (``sdt export-hub``; its
    config.json gives the model, preprocessing and label names, the data comes from ``dataset`` /
    ``data_dir``). Model and data default to the run's config.yaml when there is one; ``input_size``
    may differ from training (the models accept any resolution). A weights file outside a run starts
    from the model's pretrained cfg (input size, crop, interpolation); ``crop_pct`` overrides the crop.
    ``in_chans``, when given, must be the model's input channels (``--input-size C H W``).
    """
    path = Path(checkpoint)
    if is_hub_dir(path):
        if model is not None or use_ema:
            raise ConfigError(f"{checkpoint} is a hub folder: its config.json names the model and it holds one set of "
                              f"weights; drop --model / --ema")
        cfg, net, test_set, classes = _hub_eval_setup(path, dataset, data_dir, split, input_size, crop_pct)
        default_out = path.parent / f"{path.name}-eval-{split}-{cfg.data.input_size}px"  # not inside the folder one uploads
    else:
        cfg, net, test_set, path, run_dir = _run_eval_setup(path, model, dataset, data_dir, split, input_size, use_ema,
                                                            crop_pct)
        classes = test_set.classes
        default_out = (run_dir or path.parent) / f"eval-{split}-{cfg.data.input_size}px"
    if in_chans is not None and in_chans != cfg.model.in_chans:
        raise ConfigError(f"--input-size asks for {in_chans} input channels, but {cfg.model.name} here takes "
                          f"{cfg.model.in_chans} ({cfg.data.dataset} images are converted to that); use "
                          f"--input-size {cfg.model.in_chans} N N or --img-size N")
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


def _run_eval_setup(path: Path, model: Optional[str], dataset: Optional[str], data_dir: Optional[str], split: str,
                    input_size: Optional[int], use_ema: bool, crop_pct: Optional[float] = None
                    ) -> Tuple[TrainConfig, nn.Module, ImageSamples, Path, Optional[Path]]:
    """The model of a run folder, checkpoint folder or weights file with its weights, the ``split`` it is
    evaluated on (the run's config.yaml unless overridden), the weights file and the run folder."""
    run_dir = _run_dir_of(path)
    checkpoint = path
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
    if run_dir is None:  # no run config: the model's own preprocessing, as timm's pretrained cfg gives it
        pretrained = timm.models.get_pretrained_cfg(model) or timm.models.get_pretrained_cfg(model.split(".")[0])
        if pretrained is not None:
            cfg.data.input_size = pretrained.input_size[-1]
            cfg.data.crop_pct = pretrained.crop_pct
            cfg.data.interpolation = pretrained.interpolation or cfg.data.interpolation
    if crop_pct is not None:
        cfg.data.crop_pct = crop_pct
    weights = load_weights(path)
    cfg.data.input_size = input_size or cfg.data.input_size
    in_chans = resolve_in_chans(cfg.data, cfg.model.in_chans)
    test_set = classification_datasets(cfg, [split], in_chans)[split]
    cfg = replace(cfg, model=replace(cfg.model, in_chans=in_chans,
                                     num_classes=resolve_num_classes(cfg.model.num_classes, test_set.classes)))
    net = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
    load_into(net, weights, path)
    return cfg, net, test_set, path, run_dir


def _hub_eval_setup(path: Path, dataset: Optional[str], data_dir: Optional[str], split: str,
                    input_size: Optional[int], crop_pct: Optional[float] = None
                    ) -> Tuple[TrainConfig, nn.Module, ImageSamples, List[str]]:
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
    resolve_in_chans(cfg.data, cfg.model.in_chans)  # the data's channels must be the model's
    data_config = dict(data_config, input_size=(cfg.model.in_chans, cfg.data.input_size, cfg.data.input_size))
    if crop_pct is not None:
        data_config["crop_pct"] = crop_pct
    test_set = ImageSamples(raw_dataset(cfg.data, split, cfg.model.in_chans), create_transform(**data_config),
                            strict=cfg.data.strict_images)
    resolve_num_classes(cfg.model.num_classes, test_set.classes)  # the data's classes must fit the head
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
