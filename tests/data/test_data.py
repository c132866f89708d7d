import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_fake_fashion_mnist, write_idx
from sdt.data import (FASHION_MNIST_DIR, AugConfig, DataConfig, ImageSamples, build_transform, check_images, collate,
                      fashion_mnist, raw_dataset)
from sdt.data.images import read_idx
from sdt.errors import ConfigError, DataError
from sdt.engine import DistInfo, ResumableSampler


def test_read_idx_round_trip_and_truncation(tmp_path: Path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    data = gzip.open(tmp_path / "a.gz").read()
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(DataError, match="not a uint8 IDX file"):
        read_idx(tmp_path / "junk")


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path), "train", 10)


def test_validation_split_is_held_out_and_fixed(fake_fmnist: Path):
    train, val = fashion_mnist(str(fake_fmnist), "train", 40), fashion_mnist(str(fake_fmnist), "val", 40)
    assert (len(train), len(val)) == (160, 40)
    full = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz").reshape(200, -1)
    rows = {bytes(r) for r in full}
    assert len(rows) == 200  # every fake image is distinct, so membership identifies it
    train_rows = {bytes(r) for r in train.images.reshape(len(train), -1)}
    val_rows = {bytes(r) for r in val.images.reshape(len(val), -1)}
    assert not train_rows & val_rows and train_rows | val_rows == rows
    assert np.array_equal(fashion_mnist(str(fake_fmnist), "val", 40).images, val.images)
    assert len(fashion_mnist(str(fake_fmnist), "test", 40)) == 60


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_sizes():
    cfg = DataConfig()
    sizes = [len(raw_dataset(cfg, split)) for split in ("train", "val", "test")]
    assert sizes == [55000, 5000, 10000]
    img, label = raw_dataset(cfg, "test")[0]
    assert img.size == (28, 28) and img.mode == "L" and 0 <= label < 10


def test_labels_outside_class_range_fail_early(tmp_path: Path):
    root = write_fake_fashion_mnist(tmp_path / "bad", labels_mod=12)
    with pytest.raises(DataError, match="labels .* must be 0..9"):
        fashion_mnist(str(root), "train", 10)


def test_check_images_names_channel_size_and_class_problems(fake_fmnist: Path):
    cfg = DataConfig(data_dir=str(fake_fmnist), val_size=40)
    ds = ImageSamples(raw_dataset(cfg, "train"), build_transform(cfg, None, 1))
    check_images(ds, in_chans=1, num_classes=10, min_size=16)
    with pytest.raises(DataError, match="1 channel.*in_chans=3"):
        check_images(ds, in_chans=3, num_classes=10, min_size=16)
    with pytest.raises(DataError, match="total stride is 32.*input_size to at least 32"):
        check_images(ds, in_chans=1, num_classes=10, min_size=32)
    with pytest.raises(DataError, match="10 classes but the model has num_classes=5"):
        check_images(ds, in_chans=1, num_classes=5, min_size=16)


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone(fake_fmnist: Path):
    from sdt.data import AugConfig

    cfg = DataConfig(data_dir=str(fake_fmnist), val_size=40)
    aug = AugConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    ds = ImageSamples(raw_dataset(cfg, "train"), build_transform(cfg, aug, 1), seed=3)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = ds[5][0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    torch.manual_seed(123)  # a different global state must not change the sample
    random.seed(123)
    np.random.seed(123)
    assert torch.equal(ds[5][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)


def _image_folder(root: Path, corrupt: bool) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 20, 3), 40 * (c + i), np.uint8)).save(root / split / name / f"{i}.png")
    if corrupt:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_image_folder_skips_and_counts_corrupt_images(tmp_path: Path):
    root = _image_folder(tmp_path / "imgs", corrupt=True)
    cfg = DataConfig(dataset="folder", data_dir=str(root), input_size=16)
    raw = raw_dataset(cfg, "train", in_chans=3)
    assert raw.classes == ["cat", "dog"] and len(raw) == 7
    ds = ImageSamples(raw, build_transform(cfg, None, 3))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.skipped == 1 and batch.images.shape == (6, 3, 16, 16)
    assert sorted(batch.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    strict = ImageSamples(raw, build_transform(cfg, None, 3), strict=True)
    with pytest.raises(DataError, match="broken.png"):
        [strict[i] for i in range(len(strict))]
    assert len(raw_dataset(cfg, "val", in_chans=1)) == 6
    with pytest.raises(DataError, match="no 'test' image folder"):
        raw_dataset(cfg, "test")


def test_sampler_ranks_partition_the_global_batch_and_resume_mid_epoch():
    data = list(range(50))
    one = ResumableSampler(data, DistInfo(), seed=1, batch_size_per_rank=8)
    ranks = [ResumableSampler(data, DistInfo(rank=r, world_size=2), seed=1, batch_size_per_rank=4) for r in range(2)]
    for s in [one, *ranks]:
        s.set_position(epoch=2, start_step=0)
    order = list(one)
    per_rank = [list(s) for s in ranks]
    for step in range(50 // 8):
        union = per_rank[0][4 * step:4 * step + 4] + per_rank[1][4 * step:4 * step + 4]
        assert sorted(union) == sorted(order[8 * step:8 * step + 8])
    one.set_position(epoch=2, start_step=3)
    assert list(one) == order[24:] and len(one) == len(order) - 24
    one.set_position(epoch=3, start_step=0)
    assert list(one) != order


def test_repeated_augmentation_gives_each_copy_its_own_augmentation(fake_fmnist: Path):
    cfg = DataConfig(data_dir=str(fake_fmnist), val_size=40)
    aug = AugConfig(scale=(0.5, 1.0), reprob=0.5)
    samples = ImageSamples(raw_dataset(cfg, "train", 1), build_transform(cfg, aug, 1), seed=0)
    n = len(samples)
    sampler = ResumableSampler(samples, DistInfo(), seed=1, batch_size_per_rank=8, repeats=3)
    sampler.set_position(epoch=0, start_step=0)
    ids = list(sampler)
    assert len(ids) == n  # an epoch keeps its length ...
    images = [i % n for i in ids][:n // 3 * 3]
    assert images[0::3] == images[1::3] == images[2::3]  # ... each image three times in a row
    assert len(set(images)) == n // 3
    copies = [samples[i][0] for i in ids[:3]]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert torch.equal(samples[ids[1]][0], copies[1])  # seeded: the same copy is the same tensor
    ranks = [ResumableSampler(samples, DistInfo(rank=r, world_size=3), seed=1, batch_size_per_rank=8, repeats=3) for r in range(3)]
    for s in ranks:
        s.set_position(epoch=0, start_step=0)
    first = [list(s)[0] for s in ranks]  # the copies of one image go to the three ranks
    assert len({i % n for i in first}) == 1 and len(set(first)) == 3
    with pytest.raises(ConfigError, match="repeated_aug"):
        ResumableSampler(samples, DistInfo(), seed=1, batch_size_per_rank=8, repeats=0)
