"""sdt fid and sdt.tools.fid: safe Inception weights, extractors from other runs and models, bad inputs."""
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_overrides
from safetensors.torch import save_file

from sdt.errors import CheckpointError
from sdt.cli import main
from sdt.errors import ConfigError
from sdt.data import FASHION_MNIST_MEAN
from sdt.errors import DataError
from sdt.tools.fid import compute_fid, compute_fids, conditional_accuracy, in_domain_extractor, inception_fid, load_samples


class WritesAMarker:
    """Unpickling this object opens (creates) a file: the stand-in for code run from a weights file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _npz(path: Path, n: int = 20, labels: bool = True, channels: int = 1) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"arr_0": rng.integers(0, 256, (n, 28, 28, channels), dtype=np.uint8)}
    if labels:
        arrays["labels"] = np.arange(n) % 10
    np.savez(path, **arrays)
    return path


def test_inception_weights_with_a_pickle_payload_never_run(fake_fmnist: Path, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights-inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": WritesAMarker(marker)}, weights)
    with pytest.raises(CheckpointError, match="objects that loading would have to execute"):
        inception_fid(str(weights))
    assert not marker.exists()
    samples = _npz(tmp_path / "s.npz")
    assert main(["fid", str(samples), "--data-dir", str(fake_fmnist), "--inception-weights", str(weights),
                 "--threads", "1"]) == 2
    assert "is not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def _random_inception_state():
    """torch-fidelity's FID Inception-v3 with random weights (its constructor would download or unpickle them)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


def test_inception_gets_exactly_the_checked_weights(tmp_path: Path):
    state = _random_inception_state()
    torch.save(state, tmp_path / "inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    for name in ("inception.pth", "inception.safetensors"):
        got = inception_fid(str(tmp_path / name)).inception.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), name
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = compute_fid(images, images.clone(), "itself", inception_weights=str(tmp_path / "inception.pth"))
    assert abs(same.fid) < 1e-2 and "inception-v3" in same.extractor
    del state["fc.weight"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match="does not fit torch-fidelity's FID Inception-v3"):
        inception_fid(str(tmp_path / "incomplete.pth"))


@pytest.fixture
def classifier_run(fake_fmnist: Path, tmp_path: Path) -> Path:
    run = tmp_path / "classifier"
    overrides = tiny_overrides(fake_fmnist, **{"engine.epochs": "1"})
    assert main(["train", "--recipe", "quick", "--output", str(run)] + [a for o in overrides for a in ("-o", o)]) == 0
    return run


def test_extractor_from_an_sdt_train_run(classifier_run: Path, fake_fmnist: Path, tmp_path: Path, capsys):
    extractor = in_domain_extractor(checkpoint=str(classifier_run))
    assert (extractor.in_chans, extractor.num_classes) == (1, 10)
    assert torch.allclose(extractor.mean.flatten(), torch.tensor(FASHION_MNIST_MEAN))  # the run's normalisation
    checkpoint_folder = sorted((classifier_run / "checkpoints").iterdir())[-1]
    for checkpoint in (classifier_run, classifier_run / "best.safetensors", checkpoint_folder):
        features = in_domain_extractor("sdt_h_nano", str(checkpoint))  # the documented form, with the model name
        assert features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, extractor.num_features)
    samples = _npz(tmp_path / "s.npz")
    assert main(["fid", str(samples), "--data-dir", str(fake_fmnist), "--extractor", "sdt_h_nano",
                 "--extractor-checkpoint", str(classifier_run), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "20 samples vs 60 images of Fashion-MNIST test" in out and "conditional accuracy" in out
    with pytest.raises(ConfigError, match="holds a sdt_h_nano .* but the extractor is 'rmt_nano'"):
        in_domain_extractor("rmt_nano", str(classifier_run))
    # the bare weights file outside its run: shapes give in_chans/num_classes, but not the normalisation
    bare = tmp_path / "elsewhere" / "best.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((classifier_run / "best.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="pass the model name too"):
        in_domain_extractor(checkpoint=str(bare))
    with pytest.raises(CheckpointError, match="does not fit this model"):  # the run's model.kwargs are not in a bare file
        in_domain_extractor("sdt_h_nano", str(bare))
    grey = tmp_path / "grey.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("sdt_h_nano", in_chans=1, num_classes=10).state_dict().items()}, grey)
    with pytest.raises(DataError, match="normalisation it was trained with is unknown"):
        in_domain_extractor("sdt_h_nano", str(grey))


def test_extractor_of_another_model_is_refused(fake_fmnist: Path, tmp_path: Path, capsys):
    imagenet = timm.create_model("sdt_h_nano")  # 3 channels, 1000 classes
    weights = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, weights)
    extractor = in_domain_extractor("sdt_h_nano", str(weights))
    assert (extractor.in_chans, extractor.num_classes) == (3, 1000)  # read from the weights' shapes
    grey = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(DataError, match="the images have 1 channel.* takes 3"):
        compute_fid(grey, grey.clone(), "x", extractor)
    samples = _npz(tmp_path / "s.npz")
    args = ["fid", str(samples), "--data-dir", str(fake_fmnist), "--extractor", "sdt_h_nano",
            "--extractor-checkpoint", str(weights), "--threads", "1"]
    assert main(args) == 2
    assert "classifies 1000 classes, not Fashion-MNIST's 10" in capsys.readouterr().err
    assert main(args + ["--no-accuracy"]) == 2
    assert "the images have 1 channel(s) but extractor" in capsys.readouterr().err
    fmnist = in_domain_extractor()
    with pytest.raises(DataError, match=r"labels \[10, 11\] are not classes"):
        conditional_accuracy(fmnist, grey, torch.tensor([0, 10, 11, 3]))
    with pytest.raises(DataError, match="samples are"):
        compute_fid(grey, torch.zeros(4, 1, 32, 32, dtype=torch.uint8), "x", fmnist)


def test_fids_of_several_sample_sets_match_one_at_a_time():
    """compute_fids extracts the real features once; each set's FID is still its own, not a running mix."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=generator)
    fakes = [torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=generator),
             (real[:40].int() // 2).to(torch.uint8), real[20:].clone()]
    extractor = in_domain_extractor()
    together = compute_fids(fakes, real, "random", extractor)
    alone = [compute_fid(fake, real, "random", extractor) for fake in fakes]
    assert [r.num_fake for r in together] == [40, 40, 44]
    for a, b in zip(together, alone):
        assert abs(a.fid - b.fid) <= 1e-3 * b.fid, (a, b)
    assert len({round(r.fid, 3) for r in together}) == 3
    with pytest.raises(DataError, match="samples are"):
        compute_fids([fakes[0], torch.zeros(4, 1, 32, 32, dtype=torch.uint8)], real, "x", extractor)


def test_extractor_without_local_weights_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="inception_v3.* has no local weights .*timm would download"):
        in_domain_extractor("inception_v3")
    assert time.perf_counter() - start < 10  # no download attempts and retries (55 s before)
    with pytest.raises(ConfigError, match="did you mean sdt_h_nano"):
        in_domain_extractor("sdt_h_nnao")


def test_truncated_or_foreign_weights_give_one_line_errors(fake_fmnist: Path, tmp_path: Path, capsys):
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("rmt_nano", in_chans=1, num_classes=10).state_dict().items()}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    samples = _npz(tmp_path / "s.npz")
    for weights, message in ((truncated, "not a readable safetensors file"), (foreign, "does not look like a sdt_h_nano"),
                             (good, "does not fit this model")):
        assert main(["fid", str(samples), "--data-dir", str(fake_fmnist), "--extractor", "sdt_h_nano",
                     "--extractor-checkpoint", str(weights)]) == 2
        assert message in capsys.readouterr().err, weights


def test_load_samples_checks_the_file(tmp_path: Path):
    images, labels = load_samples(str(_npz(tmp_path / "s.npz", n=6)))
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert load_samples(str(_npz(tmp_path / "u.npz", labels=False)))[1] is None
    (tmp_path / "t.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:300])
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 28, 28, 1), np.float32))
    np.savez(tmp_path / "o.npz", arr_0=np.array([object()] * 2, dtype=object))
    np.savez(tmp_path / "l.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8), labels=np.zeros(3, np.int64))
    for name, message in (("t.npz", "not a readable .npz"), ("f.npz", "needs arr_0: uint8"),
                          ("o.npz", "not a readable .npz"), ("l.npz", "labels must be 2 integers"),
                          ("missing.npz", "does not exist")):
        with pytest.raises(DataError, match=message):
            load_samples(str(tmp_path / name))
    assert not os.path.exists(tmp_path / "pwned")
