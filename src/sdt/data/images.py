"""Datasets for training and evaluation: Fashion-MNIST from its IDX files, and any ImageFolder /
ImageNet-layout folder through timm's ``create_dataset`` and ``create_transform``.

Every split is a dataset of raw ``(PIL image, label)`` pairs wrapped in ``ImageSamples``, which
applies the transform and

- seeds the augmentation of sample ``i`` in epoch ``e`` from ``(seed, e, i)`` alone, so a batch is
  the same whatever the number of loader workers or processes and after a resume mid-epoch;
- turns an unreadable image into a skipped sample (``collate`` drops it and counts it in
  ``Batch.skipped``) or, with ``strict_images``, into an error naming the file.
"""
import gzip
import logging
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # the training set's; the shipped .fmnist weights use them
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Errors PIL raises for truncated or corrupt files (SyntaxError: broken PNG/GIF headers).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into tensors."""
    dataset: str = "fashion-mnist"      # one of DATASETS: "fashion-mnist" or "folder" (ImageFolder / ImageNet layout)
    data_dir: Optional[str] = None      # default: /usr/share/datasets/fashion-mnist for fashion-mnist
    val_size: int = 5000                # fashion-mnist: training images held out for model selection
    train_subset: Optional[int] = None  # use only the first N training images (quick runs, tests)
    val_subset: Optional[int] = None
    test_subset: Optional[int] = None
    input_size: int = 28                # side of the square image the model sees
    crop_pct: float = 1.0               # evaluation: resize to input_size / crop_pct, centre crop
    interpolation: str = "bicubic"
    workers: int = 2
    strict_images: bool = False         # True: an unreadable image is an error instead of a skip
    repeated_aug: int = 1               # DeiT's repeated augmentation: each image N times per epoch (1 = off)


@dataclass
class AugConfig:
    """Training augmentation, passed to timm's ``create_transform`` and ``Mixup``."""
    scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None         # e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    reprob: float = 0.0                        # random erasing probability
    mixup: float = 0.0                         # Mixup alpha (0 = off)
    cutmix: float = 0.0                        # CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    smoothing: float = 0.1                     # label smoothing


DATASETS = ("fashion-mnist", "folder")  # data.dataset: Fashion-MNIST's IDX files, or an ImageFolder / ImageNet layout
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")  # timm's create_transform


def _range_checker(section: str, cfg: Any) -> Callable[[bool, str, str], None]:
    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise DataError(f"{section}.{key} must be {rule}, got {getattr(cfg, key)!r}")
    return require


def check_data_config(cfg: DataConfig, aug: Optional[AugConfig] = None) -> None:
    """Each data (and augmentation) setting on its own, before any file is read: ``DataError``."""
    require = _range_checker("data", cfg)
    require(cfg.dataset in DATASETS, "dataset", " or ".join(DATASETS))
    require(cfg.dataset != "folder" or bool(cfg.data_dir), "data_dir", "a folder for data.dataset=folder "
            "(pass --data-dir /path/to/imagenet)")
    require(cfg.val_size >= 0, "val_size", ">= 0")
    for key in ("train_subset", "val_subset", "test_subset"):
        require(getattr(cfg, key) is None or getattr(cfg, key) >= 1, key, "at least 1, or null (all images)")
    require(cfg.input_size >= 1, "input_size", "at least 1 (pixels)")
    require(0 < cfg.crop_pct <= 1, "crop_pct", "in (0, 1] (0.875: resize to input_size / 0.875, centre crop)")
    require(cfg.interpolation in INTERPOLATIONS, "interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    require(cfg.workers >= 0, "workers", ">= 0 (0 = load in the training process)")
    require(cfg.repeated_aug >= 1, "repeated_aug", "at least 1 (1 = off, DeiT uses 3)")
    if aug is None:
        return
    require = _range_checker("aug", aug)
    require(len(aug.scale) == 2 and 0 < aug.scale[0] <= aug.scale[1] <= 1, "scale",
            "[min, max] with 0 < min <= max <= 1 (RandomResizedCrop area fractions)")
    for key in ("hflip", "reprob", "mixup_prob"):
        require(0 <= getattr(aug, key) <= 1, key, "a probability in [0, 1]")
    for key in ("color_jitter", "mixup", "cutmix"):
        require(getattr(aug, key) >= 0, key, ">= 0 (0 = off)")
    require(0 <= aug.smoothing < 1, "smoothing", "in [0, 1)")


class Batch(NamedTuple):
    images: Tensor   # (B, C, H, W)
    targets: Tensor  # (B,) int64
    skipped: int     # unreadable images dropped from this batch


# ---------------------------------------------------------------------------------------------
# Raw datasets: (PIL image, label) pairs


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: (N,) labels or (N, H, W) images."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3:
            raise DataError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if array.size != int(np.prod(shape)):
            raise DataError(f"{path} is truncated: header says {shape}, found {array.size} values")
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return array.reshape(shape)


def _fashion_mnist_file(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}. Install the dataset with "
                    f"'sudo apt-get install dataset-fashion-mnist' (files go to {FASHION_MNIST_DIR}); without root, "
                    f"put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    f"t10k-labels-idx1-ubyte, each optionally .gz) in a folder and pass --data-dir FOLDER "
                    f"(-o data.data_dir=FOLDER), e.g. from 'apt-get download dataset-fashion-mnist && dpkg-deb -x "
                    f"dataset-fashion-mnist_*.deb fmnist': --data-dir fmnist{FASHION_MNIST_DIR} (README: "
                    f"Fashion-MNIST without root).")


class ArrayImages(Dataset):
    """In-memory grayscale images (N, H, W) uint8 with labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def fashion_mnist(data_dir: Optional[str], split: str, val_size: int) -> ArrayImages:
    """Fashion-MNIST ``split``: "train" (60k minus ``val_size``), "val" (``val_size`` held out from
    the training files by a fixed permutation) or "test" (the 10k t10k files)."""
    root = Path(data_dir or FASHION_MNIST_DIR)
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(_fashion_mnist_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_fashion_mnist_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"Fashion-MNIST files in {root} have shapes {images.shape} / {labels.shape}; "
                        f"expected (N, H, W) images and (N,) labels")
    bad = np.flatnonzero(labels >= len(FASHION_MNIST_CLASSES))
    if bad.size:
        raise DataError(f"Fashion-MNIST labels in {root} must be 0..9; sample {bad[0]} has label "
                        f"{labels[bad[0]]} ({bad.size} such labels). Are these the right files?")
    if split != "test":
        if not 0 <= val_size < len(images):
            raise DataError(f"data.val_size={val_size} must be in [0, {len(images)})")
        order = np.random.default_rng(0).permutation(len(images))  # fixed: the same split in every run
        keep = order[val_size:] if split == "train" else order[:val_size]
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    return ArrayImages(images, labels, FASHION_MNIST_CLASSES)


def fashion_mnist_tensors(split: str = "train", data_dir: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """All of Fashion-MNIST's "train" (60k) or "test" (10k) split as tensors, for code that needs no
    augmentation (generation, FID): images (N, 1, 28, 28) uint8 and labels (N,) int64."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    data = fashion_mnist(data_dir, split, val_size=0)
    return torch.from_numpy(data.images.copy()).unsqueeze(1), torch.from_numpy(data.labels)


def _holds_an_image(folder: Path) -> bool:
    """Whether ``folder`` or a folder below it holds a file timm reads as an image (stops at the first)."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions()
    return any(Path(name).suffix.lower() in extensions for _, _, names in os.walk(folder, followlinks=True) for name in names)


class FolderImages(Dataset):
    """An ImageFolder / ImageNet-layout split read through timm's ``create_dataset``; opening an
    image may raise (``ImageSamples`` decides whether to skip)."""

    def __init__(self, root: str, split: str, img_mode: str):
        from timm.data import create_dataset
        from timm.data.readers.img_extensions import get_img_extensions

        names = {"train": ["train"], "val": ["val", "validation"], "test": ["test"]}[split]
        folder = next((Path(root) / n for n in names if (Path(root) / n).is_dir()), None)
        if folder is None:
            raise DataError(f"no '{split}' image folder under {root}: expected {root}/{names[0]}/<class>/<image> "
                            f"(ImageNet layout: train/ and val/ folders with one sub-folder per class)")
        if not _holds_an_image(folder):  # timm's own error for this is a long traceback
            raise DataError(f"the '{split}' folder {folder} holds no images ({', '.join(get_img_extensions())}): "
                            f"expected {folder}/<class>/<image>; check --data-dir")
        self.timm_dataset = create_dataset("", root=str(folder), is_training=False)
        self.reader = self.timm_dataset.reader
        self.classes = sorted(self.reader.class_to_idx, key=self.reader.class_to_idx.get)
        self.img_mode = img_mode

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        file, target = self.reader[index]
        img = Image.open(file)
        return img.convert(self.img_mode), int(target)

    def filename(self, index: int) -> str:
        return str(self.reader.filename(index, absolute=True))


def num_channels(cfg: DataConfig, in_chans: int) -> int:
    """Channels a dataset delivers: Fashion-MNIST is grayscale; folders follow the model (1 or 3)."""
    if cfg.dataset == "fashion-mnist":
        return 1
    if in_chans not in (1, 3):
        raise DataError(f"image folders are read as RGB (3 channels) or grayscale (1); model.in_chans={in_chans}")
    return in_chans


def resolve_in_chans(cfg: DataConfig, in_chans: Optional[int]) -> int:
    """The model's ``in_chans`` checked against the data's channels, or the data's when it is unset."""
    channels = num_channels(cfg, in_chans or 3)
    if in_chans is not None and in_chans != channels:
        raise DataError(f"{cfg.dataset} images have {channels} channel(s) but model.in_chans={in_chans}; "
                        f"set model.in_chans={channels} (or leave it unset)")
    return channels


def resolve_num_classes(num_classes: Optional[int], classes: Sequence[str]) -> int:
    """The model's ``num_classes`` checked against the data's classes, or their count when it is unset."""
    if num_classes is not None and num_classes < len(classes):
        raise DataError(f"the dataset has {len(classes)} classes but model.num_classes={num_classes}; "
                        f"set model.num_classes={len(classes)} (or leave it unset)")
    return num_classes or len(classes)


def raw_dataset(cfg: DataConfig, split: str, in_chans: int = 3) -> Dataset:
    """The (PIL image, label) dataset of ``split`` ("train", "val" or "test"), subset applied."""
    if cfg.dataset == "fashion-mnist":
        ds: Dataset = fashion_mnist(cfg.data_dir, split, cfg.val_size)
    elif cfg.dataset == "folder":
        if not cfg.data_dir:
            raise DataError("data.dataset=folder needs a folder: pass --data-dir /path/to/imagenet")
        ds = FolderImages(cfg.data_dir, split, "L" if num_channels(cfg, in_chans) == 1 else "RGB")
    else:
        raise DataError(f"unknown data.dataset {cfg.dataset!r}; use one of {DATASETS}")
    subset = {"train": cfg.train_subset, "val": cfg.val_subset, "test": cfg.test_subset}[split]
    if subset is not None and subset < len(ds):
        classes = ds.classes
        ds = Subset(ds, range(subset))
        ds.classes = classes
    return ds


# ---------------------------------------------------------------------------------------------
# Transforms, per-sample seeding, skipping of unreadable images


def build_transform(cfg: DataConfig, aug: Optional[AugConfig], in_chans: int, input_size: Optional[int] = None) -> Any:
    """timm's transform: training augmentation when ``aug`` is given, else resize + centre crop."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if cfg.dataset == "fashion-mnist":
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif in_chans == 1:
        mean, std = (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
    else:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    size = (in_chans, input_size or cfg.input_size, input_size or cfg.input_size)
    common = dict(mean=mean, std=std, interpolation=cfg.interpolation)
    if aug is None:
        return create_transform(size, is_training=False, crop_pct=cfg.crop_pct, **common)
    return create_transform(size, is_training=True, scale=aug.scale, hflip=aug.hflip, color_jitter=aug.color_jitter,
                            auto_augment=aug.auto_augment, re_prob=aug.reprob, re_mode="pixel", **common)


SEED_STRIDE = 1_000_003  # a prime: mixes a run's seed with a counter (epoch, batch index) into distinct seeds


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * SEED_STRIDE + epoch) * 2_147_483_647 + index & (2**63 - 1)


class ImageSamples(Dataset):
    """``(tensor, label)`` samples of a raw dataset; ``None`` for an image that cannot be read.

    With ``seed`` set, sample ``index`` of epoch ``epoch`` (see ``set_epoch``) is augmented with
    python/torch RNGs seeded from ``(seed, epoch, index)`` only; the caller's RNG states are left
    untouched, so the training loop's own randomness (dropout, Mixup) does not depend on data loading.
    """

    def __init__(self, raw: Dataset, transform: Any, seed: Optional[int] = None, strict: bool = False):
        self.raw, self.transform, self.seed, self.strict = raw, transform, seed, strict
        self.classes: List[str] = raw.classes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.raw)

    def _filename(self, index: int) -> str:
        ds, i = self.raw, index
        if isinstance(ds, Subset):
            ds, i = ds.dataset, ds.indices[i]
        return ds.filename(i) if hasattr(ds, "filename") else f"sample {index}"

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, int]]:
        """``index`` may exceed ``len(self)``: copy ``index // len(self)`` of image ``index % len(self)``
        (repeated augmentation, ``sdt.engine.ResumableSampler``), augmented with its own seed."""
        image_index = index % len(self.raw)
        try:
            img, label = self.raw[image_index]
        except IMAGE_ERRORS as e:
            if self.strict:
                raise DataError(f"cannot read image {self._filename(image_index)}: {e} "
                                f"(set data.strict_images=false to skip unreadable images)") from e
            _logger.warning("skipping unreadable image %s: %s", self._filename(image_index), e)
            return None
        if self.seed is None:
            return self.transform(img), label
        # timm/torchvision transforms draw from all three global RNGs (RandAugment uses numpy's), on the
        # CPU. Only the CPU torch generator is seeded: torch.manual_seed also queues a seed for every
        # accelerator, which records a stack trace per call and cost half the time of a 28x28 sample.
        python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        sample_seed = _sample_seed(self.seed, self.epoch, index)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.default_generator.manual_seed(sample_seed)
        try:
            x = self.transform(img)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)
        return x, label


def split_datasets(cfg: DataConfig, splits: Sequence[str], in_chans: int, transform: Callable[[bool], Any],
                   seed: int) -> Dict[str, ImageSamples]:
    """``ImageSamples`` of each of ``splits``: the raw split through ``transform(training)``, where the
    "train" split is training (augmentation seeded per sample from ``seed``) and every other split is not."""
    return {split: ImageSamples(raw_dataset(cfg, split, in_chans), transform(split == "train"),
                                seed=seed if split == "train" else None, strict=cfg.strict_images)
            for split in splits}


def collate(samples: List[Optional[Tuple[Tensor, int]]]) -> Batch:
    """Stack the readable samples into a ``Batch``; count the unreadable ones."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.long), skipped)


def check_images(dataset: ImageSamples, in_chans: int, num_classes: int, min_size: int) -> None:
    """Fail before training if the first sample has the wrong channel count or is smaller than the
    model's total stride, or if any label is outside ``[0, num_classes)``."""
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    first = next((dataset[i] for i in range(min(len(dataset), 16)) if dataset[i] is not None), None)
    if first is None:
        raise DataError(f"none of the first {min(len(dataset), 16)} images can be read")
    c, h, w = first[0].shape
    if c != in_chans:
        raise DataError(f"images have {c} channel(s) but the model expects in_chans={in_chans}; "
                        f"set model.in_chans={c}")
    if min(h, w) < min_size:
        raise DataError(f"images are {h}x{w} but the model's total stride is {min_size}; "
                        f"set data.input_size to at least {min_size}")
    if len(dataset.classes) > num_classes:
        raise DataError(f"the dataset has {len(dataset.classes)} classes but the model has num_classes={num_classes}; "
                        f"set model.num_classes={len(dataset.classes)}")
    raw = dataset.raw.dataset if isinstance(dataset.raw, Subset) else dataset.raw
    labels = getattr(raw, "labels", None)
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must be in [0, {num_classes}); found {labels.min()}..{labels.max()}")
