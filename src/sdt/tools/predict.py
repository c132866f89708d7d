"""``sdt predict``: what a trained classifier sees in image files, with the model's own preprocessing.

    predictor = load_predictor("sdt_h_nano.fmnist_e30")            # or a run folder, a hub folder,
    results = predict_images(predictor, ["shirt.png"], topk=3)    # or a weights file with arch=...

The model comes from a run folder (config.yaml + best.safetensors: the run's evaluation transform and
class names), a hub folder (``sdt export-hub``: config.json's pretrained cfg and label names), a shipped
pretrained tag (its pretrained cfg) or a weights file with ``arch`` (the architecture's pretrained cfg;
head and channels from the file). Each image becomes the model's channels (grey or RGB) and goes through
``timm.data.create_transform`` of that data config (resize, centre crop, mean/std).

An image that cannot be read (missing, a folder, empty, not an image) gives a result with an ``error``
line naming the file; the other images are still predicted.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..data import FASHION_MNIST_CLASSES
from ..engine import keep_freed_memory, load_config
from ..errors import ConfigError, DataError, SdtError
from ..files import is_hub_dir, load_hub_model, load_into, load_weights
from ..models.registry import check_model_name
from ..tasks.classify import TrainConfig, create_model
from ..tasks.pretrained import model_from_weights, shipped_weights
from .hub import run_data_config, run_label_names


@dataclass
class Predictor:
    """A classifier in eval mode, the timm data config of its preprocessing and its class names."""
    model: nn.Module
    data_config: Dict[str, Any]
    label_names: List[str]
    source: str

    @property
    def in_chans(self) -> int:
        return self.data_config["input_size"][0]


def _labels(names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """``names`` when there is one per class, else ``class_<i>``."""
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [f"class_{i}" for i in range(num_classes)]


def _tag_labels(model: nn.Module, name: str) -> List[str]:
    """A pretrained tag's class names: its cfg's label_names, or Fashion-MNIST's for the fmnist tags,
    whose registry cfgs (models/sdt_h.py) name no classes."""
    names = model.pretrained_cfg.get("label_names")
    if not names and ".fmnist" in name:
        names = FASHION_MNIST_CLASSES
    return _labels(names, model.num_classes)


def _with_channels(data_config: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """``data_config`` for the model's input channels, which a weights file may set apart from the
    architecture's cfg: mean/std averaged to grey (as ``sdt.data.build_transform`` does) or repeated to RGB."""
    in_chans = getattr(model, "in_chans", data_config["input_size"][0])
    if in_chans == data_config["input_size"][0]:
        return data_config
    def fit(values):
        return (sum(values) / len(values),) * in_chans if in_chans == 1 or len(values) == 1 else tuple(values)
    return dict(data_config, input_size=(in_chans, *data_config["input_size"][1:]),
                mean=fit(data_config["mean"]), std=fit(data_config["std"]))


def _run_predictor(run_dir: Path) -> Predictor:
    cfg = load_config(TrainConfig, str(run_dir / "config.yaml"))
    best = run_dir / "best.safetensors"
    if not best.is_file():
        raise ConfigError(f"{run_dir} has no best.safetensors yet: let the run finish (or resume it with "
                          f"sdt train --output {run_dir} --resume), or pass one of its weights files with --arch")
    model = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
    load_into(model, load_weights(best), best)
    try:
        names = list(run_label_names(cfg))
    except SdtError:  # the run's training folder is gone: its class names with it
        names = []
    return Predictor(model.eval(), run_data_config(cfg), _labels(names, cfg.model.num_classes), str(run_dir))


def load_predictor(source: str, arch: Optional[str] = None) -> Predictor:
    """The classifier of ``source`` (a run folder, a hub folder, a shipped tag such as
    ``sdt_h_nano.fmnist_e30``, or a weights file with ``arch``) with its preprocessing and class names."""
    path = Path(source)
    if is_hub_dir(path):
        model, data_config = load_hub_model(path)
        return Predictor(model, data_config, _labels(model.pretrained_cfg.get("label_names"), model.num_classes), source)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _run_predictor(path)
    if shipped_weights(source) is not None:
        model = timm.create_model(source, pretrained=True).eval()
        return Predictor(model, timm.data.resolve_data_config(model=model), _tag_labels(model, source), source)
    if path.is_file():
        if arch is None:
            raise ConfigError(f"{source} is a weights file: name its architecture with --arch (e.g. --arch sdt_h_nano), "
                              f"or pass its run folder")
        check_model_name(arch)
        model = model_from_weights(arch, source).eval()
        labels = _tag_labels(model, arch) if "." in arch else _labels(None, model.num_classes)
        return Predictor(model, _with_channels(timm.data.resolve_data_config(model=model), model), labels, source)
    if path.is_dir():
        raise ConfigError(f"{source} is a folder but neither a run folder (config.yaml) nor a hub folder "
                          f"(config.json + model.safetensors)")
    raise ConfigError(f"--model {source}: no such file or folder, and not a shipped pretrained tag "
                      f"(sdt_h_nano.fmnist_e30, sdt_h_nano.fmnist)")


def read_image(path: str, in_chans: int) -> Image.Image:
    """The image at ``path`` as the model's channels (grey for 1, RGB for 3); a ``DataError`` naming
    the file when it cannot be read."""
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(file) as img:
            return img.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image (corrupt or another format): {e}") from e


@torch.no_grad()
def predict_images(predictor: Predictor, images: Sequence[str], topk: int = 5,
                   transform: Optional[Callable] = None) -> List[Dict[str, Any]]:
    """One result per image, in order: ``{"image", "predictions": [{"label", "index", "probability"}]}``
    (top ``topk``, most probable first), or ``{"image", "error"}`` for an image that cannot be read."""
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    transform = transform or timm.data.create_transform(**predictor.data_config)
    k = min(topk, len(predictor.label_names))
    results = []
    for path in images:
        try:
            x = transform(read_image(path, predictor.in_chans)).unsqueeze(0)  # (1, C, H, W)
        except DataError as e:
            results.append({"image": path, "error": str(e)})
            continue
        probabilities = predictor.model(x).float().softmax(-1)[0]  # (num_classes,)
        top = probabilities.topk(k)
        results.append({"image": path, "predictions": [
            {"label": predictor.label_names[i], "index": i, "probability": p}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return results


def format_predictions(results: Sequence[Dict[str, Any]]) -> str:
    """The results as text: per image its path, then one line per class with its probability."""
    lines = []
    for result in results:
        if "error" in result:
            continue
        lines.append(result["image"])
        width = max(len(p["label"]) for p in result["predictions"])
        lines += [f"  {p['label']:<{width}}  {p['probability']:.4f}" for p in result["predictions"]]
    return "\n".join(lines)


def predict_command(images: Sequence[str], model: str, arch: Optional[str] = None, topk: int = 5,
                    as_json: bool = False) -> int:
    """``sdt predict``: print the predictions (text or JSON) on stdout and one line per unreadable image on
    stderr. Returns the exit status: 0 when every image was predicted, 1 when any could not be read."""
    import json
    import sys

    keep_freed_memory()  # as the engine's commands do: no page faults for each batch's activations
    results = predict_images(load_predictor(model, arch), images, topk)
    for result in results:
        if "error" in result:
            print(f"sdt predict: error: {result['error']}", file=sys.stderr)
    text = json.dumps(results, indent=2) if as_json else format_predictions(results)
    if text:
        print(text)
    return 1 if any("error" in r for r in results) else 0
