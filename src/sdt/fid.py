"""FID with a pluggable feature extractor (torchmetrics' ``FrechetInceptionDistance``), and the
accuracy of an in-domain classifier on class-conditional samples.

Extractors:
- in-domain (default): the pre-logit features of a classifier trained on the same dataset. For
  Fashion-MNIST the package ships ``sdt_h_nano.fmnist`` (512 features; see
  docs/generation.md), so FIDs from different users compare.
- Inception: torchmetrics' FID Inception-v3 (2048 features), only from a local weights file
  (``pt_inception-2015-12-05-6726825d.pth``); never downloaded. Needs ``pip install sdt[fid-inception]``.

An FID is only comparable with the same extractor, sample count and reference split: ``FidResult``
prints all three.
"""
import os
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn
from torch import Tensor

DEFAULT_EXTRACTOR = "sdt_h_nano.fmnist"


class ClassifierFeatures(nn.Module):
    """uint8 images (B, C, H, W) -> pre-logit features (B, num_features) of a timm classifier.

    Normalises with the classifier's pretrained mean/std; ``logits`` gives the class scores instead.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        cfg = getattr(classifier, "pretrained_cfg", {}) or {}
        channels = classifier.in_chans if hasattr(classifier, "in_chans") else 3
        mean = torch.tensor(cfg.get("mean", (0.5,) * channels), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.5,) * channels), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.num_features = int(classifier.head_hidden_size if hasattr(classifier, "head_hidden_size") else classifier.num_features)

    def normalize(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype}; convert with sdt.generate.model_to_images")
        return (images.float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        features = self.classifier.forward_features(self.normalize(images))
        return self.classifier.forward_head(features, pre_logits=True)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(self.normalize(images))


def in_domain_extractor(name: str = DEFAULT_EXTRACTOR, checkpoint: Optional[str] = None) -> ClassifierFeatures:
    """A timm classifier as feature extractor: a pretrained tag (default: the shipped Fashion-MNIST one) or
    ``checkpoint``, a safetensors file for the model ``name`` (e.g. the output of ``sdt train``)."""
    import sdt  # noqa: F401  (registers the models)

    if checkpoint is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    else:
        model = timm.create_model(name, pretrained=True)
    return ClassifierFeatures(model)


def inception_fid(weights_path: Optional[str]):
    """torchmetrics FID with Inception-v3 features from a local weights file; a clear error otherwise."""
    if not weights_path or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights file {weights_path!r} not found. sdt never downloads weights: fetch "
            "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID Inception) on a machine with network access "
            "and pass --inception-weights /path/to/it, or use the default in-domain extractor")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"Inception FID needs torch-fidelity: pip install 'sdt[fid-inception]' ({err})") from err


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
def compute_fid(fake: Tensor, real: Tensor, reference: str, extractor: Optional[ClassifierFeatures] = None,
                extractor_name: str = DEFAULT_EXTRACTOR, inception_weights: Optional[str] = None,
                batch_size: int = 500) -> FidResult:
    """FID between uint8 image sets fake (N, C, H, W) and real (M, C, H, W).

    Uses ``extractor`` (default: the shipped in-domain one) or, with ``inception_weights``, Inception-v3
    (grey images are repeated to 3 channels; torchmetrics resizes to 299).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if inception_weights is not None:
        metric, name, prepare = inception_fid(inception_weights), "inception-v3 (2048, pool3)", _to_rgb
    else:
        extractor = extractor or in_domain_extractor(extractor_name)
        metric = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
        name, prepare = f"{extractor_name} pre-logits ({extractor.num_features})", (lambda x: x)
    for images, real_flag in ((real, True), (fake, False)):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            metric.update(prepare(images[i:i + batch_size]), real=real_flag)
    return FidResult(float(metric.compute()), len(fake), len(real), reference, name)


@torch.no_grad()
def conditional_accuracy(extractor: ClassifierFeatures, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of samples (uint8 (N, C, H, W)) that the in-domain classifier assigns to their conditioning label."""
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (extractor.logits(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)
