"""FID with a pluggable feature extractor (torchmetrics' ``FrechetInceptionDistance``), and the
accuracy of an in-domain classifier on class-conditional samples.

Extractors:
- in-domain (default): the pre-logit features of a classifier trained on the same dataset. For
  Fashion-MNIST the package ships ``sdt_h_nano.fmnist_e30`` (512 features, 30 epochs; see
  docs/generation.md), so FIDs from different users compare; ``sdt_h_nano.fmnist`` (12 epochs) is the
  extractor of the FIDs published before it. Any classifier trained with
  ``sdt train`` works too (``in_domain_extractor(checkpoint=<run folder>)``).
- Inception: torch-fidelity's FID Inception-v3 (2048 features) through torchmetrics, only from a
  local weights file (``weights-inception-2015-12-05-6726825d.pth``); never downloaded. Needs the
  ``fid-inception`` extra (``pip install -e '.[fid-inception]'`` in the checkout).

Weights are never downloaded and never unpickled with code: every file goes through
``sdt.files.load_weights`` (safetensors, or ``torch.load(weights_only=True)``).

An FID is only comparable with the same extractor, sample count and reference split: ``FidResult``
prints all three.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torch import Tensor
from torchvision.transforms import Normalize

from ..data import build_transform
from ..engine import load_config, setup_distributed
from ..errors import CheckpointError, ConfigError, DataError, require_extra
from ..files import load_into, load_weights

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

DEFAULT_EXTRACTOR = "sdt_h_nano.fmnist_e30"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset


class ClassifierFeatures(nn.Module):
    """uint8 images (B, C, H, W) -> pre-logit features (B, num_features) of a timm classifier.

    Normalises with ``mean``/``std`` (one entry per input channel; default: the classifier's
    pretrained_cfg); ``logits`` gives the class scores instead.
    """

    def __init__(self, classifier: nn.Module, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, name: Optional[str] = None):
        super().__init__()
        self.classifier = classifier.eval()
        cfg = getattr(classifier, "pretrained_cfg", {}) or {}
        self.name = name or cfg.get("architecture", type(classifier).__name__)
        self.in_chans = int(classifier.in_chans if hasattr(classifier, "in_chans") else 3)
        self.num_classes = int(classifier.num_classes)
        mean, std = tuple(mean or cfg.get("mean", (0.5,) * self.in_chans)), tuple(std or cfg.get("std", (0.5,) * self.in_chans))
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise DataError(f"extractor {self.name} takes {self.in_chans}-channel images but its normalisation has "
                            f"{len(mean)} mean / {len(std)} std entries; give one per channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_features = int(classifier.head_hidden_size if hasattr(classifier, "head_hidden_size") else classifier.num_features)

    def check_images(self, images: Tensor) -> None:
        """A ``DataError`` unless ``images`` are uint8 (B, in_chans, H, W)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}; "
                            "convert with sdt.tasks.sampling.model_to_images")
        if images.shape[1] != self.in_chans:
            raise DataError(f"the images have {images.shape[1]} channel(s) but extractor {self.name} takes {self.in_chans}: "
                            f"use a classifier trained on these images (e.g. an 'sdt train' run on the reference data)")

    def normalize(self, images: Tensor) -> Tensor:
        self.check_images(images)
        return (images.float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        features = self.classifier.forward_features(self.normalize(images))
        return self.classifier.forward_head(features, pre_logits=True)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(self.normalize(images))


def _known_model(name: str) -> str:
    """The architecture of a timm model name[.tag], or a ``ConfigError`` suggesting close names."""
    from ..models.registry import check_model_name

    check_model_name(name)
    return name.split(".")[0]


def _weights_in_run(checkpoint: str) -> Tuple[Path, Optional[Path]]:
    """(weights file, run folder or None) for a run folder (its best weights), a checkpoint folder in
    it (its model weights) or a weights file."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / ("best.safetensors" if (path / "best.safetensors").is_file() else "model.safetensors")
    run = next((p for p in list(path.parents)[:3] if (p / "config.yaml").is_file()), None)
    return path, run


def in_domain_extractor(name: Optional[str] = None, checkpoint: Optional[str] = None) -> ClassifierFeatures:
    """A timm classifier as feature extractor, never downloaded:

    - without ``checkpoint``: a pretrained tag with local weights (default: the shipped Fashion-MNIST one);
    - ``checkpoint``: the output of ``sdt train`` (run folder, checkpoint folder or a weights file in
      it): model, in_chans, num_classes and input normalisation come from the run's config.yaml;
      a weights file outside a run needs ``name``, and in_chans / num_classes are read from its shapes.
    """
    if checkpoint is None:
        return _pretrained_extractor(name or DEFAULT_EXTRACTOR)
    path, run = _weights_in_run(checkpoint)
    state = load_weights(path)
    if run is not None:
        from ..tasks.classify import TrainConfig, create_model

        try:
            cfg = load_config(TrainConfig, str(run / "config.yaml"))
        except ConfigError as e:
            raise ConfigError(f"{run} is not a classifier run of 'sdt train' ({e}); the extractor must be a classifier") from e
        if name is not None and _known_model(name) != cfg.model.name:
            raise ConfigError(f"{path} holds a {cfg.model.name} (its run's config.yaml) but the extractor is {name!r}; "
                              f"drop --extractor or pass --extractor {cfg.model.name}")
        in_chans = cfg.model.in_chans or _input_channels(state, cfg.model.name, path)
        num_classes = cfg.model.num_classes or _head_classes(state, cfg.model.name, path)
        model = create_model(cfg.model, num_classes, in_chans)
        load_into(model, state, path)
        normalize = next(t for t in build_transform(cfg.data, None, in_chans).transforms if isinstance(t, Normalize))
        mean, std, label = normalize.mean.tolist(), normalize.std.tolist(), f"{cfg.model.name} ({path})"
    else:
        if name is None:
            raise ConfigError(f"{path} is not inside an 'sdt train' run folder (no config.yaml above it): "
                              "pass the model name too (--extractor NAME), or the run folder")
        arch = _known_model(name)
        in_chans, num_classes = _input_channels(state, arch, path), _head_classes(state, arch, path)
        model = timm.create_model(arch, in_chans=in_chans, num_classes=num_classes)
        load_into(model, state, path)
        mean, std, label = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std"), f"{arch} ({path})"
        if mean is not None and len(mean) != in_chans:
            raise DataError(f"{path} takes {in_chans}-channel images, but {arch}'s default normalisation has "
                            f"{len(mean)} channels, and outside a run folder the normalisation it was trained with is "
                            f"unknown: pass the run folder of 'sdt train' instead of the bare weights file")
    return ClassifierFeatures(model, mean, std, name=label)


def _pretrained_extractor(name: str) -> ClassifierFeatures:
    _known_model(name)  # a ConfigError, with suggestions, for an unknown name
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.file:
        source = cfg and (cfg.hf_hub_id or cfg.url)
        raise ConfigError(f"extractor {name!r} has no local weights" + (f" (timm would download {source})" if source else "")
                          + ": sdt never downloads weights. Pass a classifier you trained or downloaded with "
                            f"--extractor-checkpoint FILE, --inception-weights FILE for Inception-v3, or use the "
                            f"shipped {DEFAULT_EXTRACTOR}")
    model = timm.create_model(name, num_classes=cfg.num_classes, in_chans=cfg.input_size[0])
    load_into(model, load_weights(cfg.file), cfg.file)
    return ClassifierFeatures(model, cfg.mean, cfg.std, name=name)


def _tensor_dim(state: dict, key: str, dim: int, arch: str, path: Path) -> int:
    if key not in state or state[key].ndim <= dim:
        raise CheckpointError(f"{path} does not look like a {arch} checkpoint (no {key}); "
                              f"check the model name or pass the run folder of 'sdt train'")
    return int(state[key].shape[dim])


def _input_channels(state: dict, arch: str, path: Path) -> int:
    """in_chans of a timm model's weights: the input dimension of its first conv (pretrained_cfg's first_conv)."""
    return _tensor_dim(state, timm.models.get_pretrained_cfg(arch).first_conv + ".weight", 1, arch, path)


def _head_classes(state: dict, arch: str, path: Path) -> int:
    """num_classes of a timm model's weights: the output dimension of its classifier (pretrained_cfg's classifier)."""
    return _tensor_dim(state, timm.models.get_pretrained_cfg(arch).classifier + ".weight", 0, arch, path)


def inception_fid(weights_path: Optional[str]) -> "FrechetInceptionDistance":
    """torchmetrics FID with torch-fidelity's Inception-v3 features from a local weights file.

    The file is read here without running code from it (``load_weights``), and torch-fidelity gets
    a copy of the checked tensors: it would otherwise ``torch.load(weights_only=False)`` the file itself.
    """
    if not weights_path or not Path(weights_path).is_file():
        raise CheckpointError(
            f"Inception weights file {weights_path!r} not found. sdt never downloads weights: fetch "
            f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity's FID Inception) on a machine with network access "
            "and pass --inception-weights /path/to/it, or use the default in-domain extractor")
    state = load_weights(weights_path)
    require_extra("torch_fidelity", "fid-inception", "Inception FID")
    from torchmetrics.image.fid import FrechetInceptionDistance
    with tempfile.TemporaryDirectory() as folder:
        checked = Path(folder) / "inception.pth"
        torch.save(dict(state), checked)  # only the tensors read above: unpickling it runs nothing foreign
        try:
            return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(checked))
        except RuntimeError as e:  # load_state_dict(strict=True): missing / unexpected keys, wrong shapes
            raise CheckpointError(f"{weights_path} does not fit torch-fidelity's FID Inception-v3 "
                                  f"({str(e).splitlines()[0]} ...): pass {INCEPTION_WEIGHTS_FILE}") from e


def load_samples(path: str) -> Tuple[Tensor, Optional[Tensor]]:
    """The samples of an .npz written by ``sdt sample``: uint8 images (N, C, H, W) from ``arr_0``
    (N, H, W, C), and the labels (N,) int64 when the file has them (no pickles are read)."""
    import numpy as np

    if not Path(path).is_file():
        raise DataError(f"samples file {path} does not exist; write it with 'sdt sample RUN --out PREFIX'")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("arr_0", "labels") if key in data}
    except Exception as e:  # not a zip, truncated, an object array: numpy raises many types
        raise DataError(f"{path} is not a readable .npz of samples (truncated, or not written by 'sdt sample'?): {e}") from e
    images, labels = arrays.get("arr_0"), arrays.get("labels")
    if images is None or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path} needs arr_0: uint8 images (N, H, W, C) as 'sdt sample' writes, got "
                        f"{None if images is None else (images.dtype, images.shape)}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: labels must be {len(images)} integers, one per image, got {labels.dtype} {labels.shape}")
    fake = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return fake, None if labels is None else torch.from_numpy(labels).long()


@dataclass
class FidResult:
    fid: float
    num_fake: int
    num_real: int
    reference: str
    extractor: str

    def __str__(self) -> str:
        return (f"FID {self.fid:.2f} ({self.num_fake} samples vs {self.num_real} images of {self.reference}, "
                f"extractor {self.extractor})")


def _to_rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def compute_fids(fakes: Sequence[Tensor], real: Tensor, reference: str, extractor: Optional[ClassifierFeatures] = None,
                 extractor_name: Optional[str] = None, inception_weights: Optional[str] = None,
                 batch_size: int = 500, device: Optional[torch.device] = None) -> List[FidResult]:
    """FID of each uint8 image set in ``fakes`` (N_k, C, H, W) against ``real`` (M, C, H, W), all of one
    image size; the real features are extracted once for all of them.

    Uses ``extractor`` (default: the shipped in-domain one) or, with ``inception_weights``, Inception-v3
    (grey images are repeated to 3 channels; torchmetrics resizes to 299). The features are computed on
    ``device``: by default the extractor's, and the CPU for Inception.
    """
    require_extra("torchmetrics", "fid", "FID")
    from torchmetrics.image.fid import FrechetInceptionDistance

    for images, which in [(real, "reference images")] + [(fake, "samples") for fake in fakes]:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) < 2:
            raise DataError(f"{which}: expected at least 2 uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[1:] != real.shape[1:]:
            raise DataError(f"the samples are {tuple(images.shape[1:])} (C, H, W) but the reference images "
                            f"{tuple(real.shape[1:])}: FID compares images of one kind")
    if inception_weights is not None:
        metric, name, prepare = inception_fid(inception_weights), "inception-v3 (2048, pool3)", _to_rgb
        metric = metric.to(device or torch.device("cpu"))
    else:
        extractor = extractor or in_domain_extractor()
        extractor.check_images(real[:1])
        metric = FrechetInceptionDistance(feature=extractor).to(device or extractor.mean.device)
        name, prepare = f"{extractor_name or extractor.name} pre-logits ({extractor.num_features})", (lambda x: x)
    metric.reset_real_features = False  # reset() below forgets only the previous samples' features
    device = metric.device
    for i in range(0, len(real), batch_size):
        metric.update(prepare(real[i:i + batch_size]).to(device), real=True)
    results = []
    for fake in fakes:
        metric.reset()
        for i in range(0, len(fake), batch_size):
            metric.update(prepare(fake[i:i + batch_size]).to(device), real=False)
        results.append(FidResult(float(metric.compute()), len(fake), len(real), reference, name))
    return results


def compute_fid(fake: Tensor, real: Tensor, reference: str, extractor: Optional[ClassifierFeatures] = None,
                extractor_name: Optional[str] = None, inception_weights: Optional[str] = None,
                batch_size: int = 500, device: Optional[torch.device] = None) -> FidResult:
    """FID between uint8 image sets fake (N, C, H, W) and real (M, C, H, W): ``compute_fids`` for one set."""
    return compute_fids([fake], real, reference, extractor, extractor_name, inception_weights, batch_size, device)[0]


@torch.no_grad()
def conditional_accuracy(extractor: ClassifierFeatures, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of samples (uint8 (N, C, H, W)) that the in-domain classifier assigns to their conditioning label."""
    if labels.ndim != 1 or len(labels) != len(images) or len(labels) == 0:
        raise DataError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= extractor.num_classes)]
    if len(bad):
        raise DataError(f"labels {bad.unique()[:5].tolist()} are not classes of extractor {extractor.name} "
                        f"(0..{extractor.num_classes - 1}): the classifier must be trained on the samples' classes")
    correct = 0
    for i in range(0, len(images), batch_size):
        predicted = extractor.logits(images[i:i + batch_size].to(extractor.mean.device)).argmax(1).cpu()
        correct += (predicted == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def fid_command(samples: str, reference_split: str = "test", num_reference: int = 0, data_dir: Optional[str] = None,
                extractor_name: Optional[str] = None, extractor_checkpoint: Optional[str] = None,
                inception_weights: Optional[str] = None, accuracy: bool = True,
                threads: Optional[int] = None, device: str = "auto") -> Iterator[str]:
    """``sdt fid``: the FID of an .npz of samples against a Fashion-MNIST split and, when the samples have
    labels (and ``accuracy``), the in-domain classifier's accuracy on them; yields the lines to print.
    ``threads``: torch's intra-op threads (None: PyTorch's own choice, every core); ``device``: auto (the
    GPU when there is one), cpu or cuda."""
    from ..data import FASHION_MNIST_CLASSES, fashion_mnist_tensors

    require_extra("torchmetrics", "fid", "sdt fid")  # before any work
    if threads:
        torch.set_num_threads(threads)
    fake, labels = load_samples(samples)
    real, _ = fashion_mnist_tensors(reference_split, data_dir)
    reference = f"Fashion-MNIST {reference_split}"
    if num_reference:
        real, reference = real[:num_reference], f"{reference}[:{num_reference}]"
    on = setup_distributed(device).device
    extractor = in_domain_extractor(extractor_name, extractor_checkpoint).to(on)
    scored = None
    if labels is not None and accuracy:
        if extractor.num_classes != len(FASHION_MNIST_CLASSES):
            raise ConfigError(f"the samples have labels, but extractor {extractor.name} classifies {extractor.num_classes} "
                              f"classes, not Fashion-MNIST's {len(FASHION_MNIST_CLASSES)}: use a Fashion-MNIST classifier "
                              "or pass --no-accuracy")
        conditional = labels >= 0  # unconditional samples (label -1) have no class to check
        scored = conditional_accuracy(extractor, fake[conditional], labels[conditional]), int(conditional.sum())
    yield str(compute_fid(fake, real, reference, extractor, inception_weights=inception_weights, device=on))
    if scored is not None:
        yield f"conditional accuracy {scored[0]:.4f} ({scored[1]} samples, classifier {extractor.name})"
