"""Generation training on the shared engine, sampling outputs, FID and the shipped Fashion-MNIST extractor."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import free_port
from sdt.errors import CheckpointError
from sdt.cli import main
from sdt.engine import load_config
from sdt.errors import ConfigError
from sdt.data import fashion_mnist_tensors
from sdt.engine.checkpoints import checkpoint_dirs
from sdt.tools.fid import ClassifierFeatures, compute_fid, conditional_accuracy, in_domain_extractor, inception_fid
from sdt.data import DataConfig
from sdt.errors import DataError
from sdt.tasks.generate import GenConfig, Generate, generation_transform, load_generator
from sdt.tasks.sampling import UNCONDITIONAL, class_labels, sample_images, save_samples
from sdt.models.dit import create_dit

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _overrides(data_dir: Path, **extra: str) -> list:
    """A seconds-long gen-train run: a 1-block, width-32 DiT on the fake 200-image Fashion-MNIST."""
    values = {"model.kwargs": "{hidden_size: 32, depth: 1, num_heads: 2}", "data.data_dir": str(data_dir),
              "data.val_size": "40", "data.workers": "0", "engine.batch_size": "16", "engine.epochs": "2",
              "engine.threads": "1", "engine.log_every_steps": "2", "engine.ckpt_every_steps": "3",
              "engine.keep_checkpoints": "20", "engine.ema_decay": "0.9", "sample.steps": "2", "sample.preview_per_class": "2"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _config(data_dir: Path, **extra: str) -> GenConfig:
    return load_config(GenConfig, "gen-fashion-mnist", _overrides(data_dir, **extra))


@pytest.fixture
def trained_run(fake_fmnist: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    Generate().train(_config(fake_fmnist), str(run))
    return run


def test_gen_train_writes_a_run_and_resume_is_exact(trained_run: Path, fake_fmnist: Path, tmp_path: Path):
    for name in ("config.yaml", "metrics.jsonl", "train.log", "best.safetensors", "curves.png", "samples.png",
                 "report.md", "summary.json"):
        assert (trained_run / name).is_file(), name
    steps = [int(p.name.split("-")[1]) for p in checkpoint_dirs(trained_run)]
    assert steps[-1] == 2 * (160 // 16) and 3 in steps
    # Resume a copy from the step-3 checkpoint (mid-epoch 1): timesteps, noise, label dropout and
    # flips must continue exactly, so the final weights equal the uninterrupted run's bitwise.
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    for later in checkpoint_dirs(copy)[1:]:
        shutil.rmtree(later)
    Generate().train(None, str(copy), resume="auto")  # the saved config
    final_a, final_b = checkpoint_dirs(trained_run)[-1], checkpoint_dirs(copy)[-1]
    assert final_a.name == final_b.name
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(final_a / name), load_file(final_b / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    model, cfg = load_generator(str(copy))
    assert cfg.model.objective == "flow" and cfg.model.num_classes == 10 and model.in_channels == 1
    with pytest.raises(ConfigError, match="--resume"):
        Generate().train(_config(fake_fmnist), str(trained_run))


@pytest.mark.parametrize("change, error, message", [
    ({"model.learn_sigma": "true"}, ConfigError, "needs model.objective=ddpm"),
    ({"model.name": "dit_n_4", "data.input_size": "30"}, ConfigError, "not a multiple of patch_size"),
    ({"model.decay": "linear"}, ConfigError, "model.decay must be one of"),
    ({"sample.sampler": "ddim"}, ConfigError, "does not fit model.objective=flow"),
    ({"model.in_chans": "3"}, Exception, "set model.in_chans=1"),
    # keys generation_transform used to ignore silently
    ({"data.test_subset": "5"}, ConfigError, "data.test_subset has no effect"),
    ({"data.interpolation": "cubic"}, ConfigError, "data.interpolation must be one of"),
    ({"data.crop_pct": "0"}, ConfigError, "data.crop_pct must be in"),
    ({"sample.steps": "0"}, ConfigError, "sample.steps must be an integer from 1"),
    ({"sample.cfg_scale": ".nan"}, ConfigError, "sample.cfg_scale must be a finite number"),
    ({"sample.preview_per_class": "-1"}, ConfigError, "sample.preview_per_class must be >= 0"),
    # the data section is checked as sdt train checks it (these used to fail after config.yaml was written)
    ({"data.workers": "-1"}, DataError, "data.workers must be >= 0"),
    ({"data.val_size": "-1"}, DataError, "data.val_size must be >= 0"),
    ({"data.repeated_aug": "0"}, DataError, "data.repeated_aug must be at least 1"),
    ({"aug.hflip": "1.5"}, ConfigError, "aug.hflip must be a probability"),
])
def test_bad_gen_configs_fail_before_writing(fake_fmnist: Path, tmp_path: Path, change, error, message):
    with pytest.raises(error, match=message):
        Generate().train(_config(fake_fmnist, **change), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_ddpm_with_learned_sigma_trains_and_samples(fake_fmnist: Path, tmp_path: Path):
    Generate().train(_config(fake_fmnist, **{"model.objective": "ddpm", "model.learn_sigma": "true", "engine.epochs": "1"}),
                    str(tmp_path / "run"))
    model, cfg = load_generator(str(tmp_path / "run"), "best")
    assert model.learn_sigma and model.out_channels == 2
    images = sample_images(model, cfg.model.objective, class_labels(10, 1), seed=0, num_steps=2, cfg_scale=2.0)
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8


def test_gen_train_runs_under_torchrun(fake_fmnist: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    args = ["gen-train", "--output", str(run)] + [a for o in _overrides(fake_fmnist, **{"engine.epochs": "1"}) for a in ("-o", o)]
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                             "-m", "sdt.cli", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in (run / "train.log").read_text()
    assert checkpoint_dirs(run)[-1].name == f"step-{160 // 16:08d}" and (run / "samples.png").is_file()


def test_sampling_is_seeded_and_batch_independent(trained_run: Path, tmp_path: Path):
    model, _ = load_generator(str(trained_run))
    labels = class_labels(10, 1)
    a = sample_images(model, "ddpm", labels, seed=1, sampler="ddpm", num_steps=3, batch_size=10)
    b = sample_images(model, "ddpm", labels, seed=1, sampler="ddpm", num_steps=3, batch_size=10)
    c = sample_images(model, "ddpm", labels, seed=2, sampler="ddpm", num_steps=3, batch_size=10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    heun = [sample_images(model, "flow", labels, seed=1, num_steps=2, batch_size=n) for n in (10, 3)]
    assert torch.equal(heun[0], heun[1])  # deterministic samplers: sample i does not depend on the batching
    paths = save_samples(a, labels, str(tmp_path / "s"), grid_per_class=1)
    with np.load(paths["npz"]) as data:
        assert data["arr_0"].shape == (10, 28, 28, 1) and data["arr_0"].dtype == np.uint8
        assert (data["labels"] == labels.numpy()).all()
    from PIL import Image
    assert Image.open(paths["png"]).size == (28, 10 * 29 - 1)


# Accuracy on the first 500 test images, measured: fmnist_e30 93.4% (93.44% on all 10k), fmnist 91.8% (91.66%).
@pytest.mark.parametrize("tag, floor", [("sdt_h_nano.fmnist_e30", 0.92), ("sdt_h_nano.fmnist", 0.9)])
def test_shipped_extractors_load_offline_and_classify(tag, floor):
    model = timm.create_model(tag, pretrained=True)
    assert (model.in_chans, model.num_classes) == (1, 10)
    plain = timm.create_model("sdt_h_nano")  # a shipped tag must not become the architecture's default
    assert (plain.in_chans, plain.num_classes) == (3, 1000)
    extractor = ClassifierFeatures(model)
    images, labels = fashion_mnist_tensors("test")
    assert conditional_accuracy(extractor, images[:500], labels[:500]) > floor
    assert extractor(images[:2]).shape == (2, extractor.num_features)


def test_the_default_extractor_is_the_30_epoch_one():
    images = fashion_mnist_tensors("test")[0][:4]
    default = in_domain_extractor()(images)
    assert torch.equal(default, in_domain_extractor("sdt_h_nano.fmnist_e30")(images))
    assert not torch.allclose(default, in_domain_extractor("sdt_h_nano.fmnist")(images))


@pytest.mark.slow  # ~80 s on the shared 2-core machine (2000 extractor forwards)
def test_fid_separates_data_from_noise():
    extractor = in_domain_extractor()
    images, _ = fashion_mnist_tensors("test")
    real, other = images[:500], images[500:1000]
    noise = torch.randint(0, 256, other.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    same = compute_fid(other, real, "Fashion-MNIST test[:500]", extractor)
    far = compute_fid(noise, real, "Fashion-MNIST test[:500]", extractor)
    assert 0 <= same.fid < far.fid / 10
    assert "500 samples vs 500 images of Fashion-MNIST test[:500]" in str(same) and "extractor" in str(same)


def test_inception_needs_a_local_file():
    with pytest.raises(CheckpointError, match="never downloads"):
        inception_fid(None)
    with pytest.raises(CheckpointError, match="--inception-weights"):
        inception_fid("/nonexistent/pt_inception.pth")


def test_cli_gen_train_sample_fid(fake_fmnist: Path, tmp_path: Path, capsys):
    run = str(tmp_path / "run")
    args = ["gen-train", "--output", run, "--decay", "fixed", "--epochs", "1"]
    assert main(args + [a for o in _overrides(fake_fmnist) for a in ("-o", o)]) == 0
    assert main(["gen-train", "--output", run, "--resume", "--attn", "cag"]) == 2  # resume keeps the saved config
    assert main(["sample", run, "--out", str(tmp_path / "s"), "--per-class", "2", "--threads", "1"]) == 0
    assert main(["fid", str(tmp_path / "s.npz"), "--num-reference", "200", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "flow, sampler default, 2 steps, cfg scale 1.5" in out  # the run's sample section
    assert "FID" in out and "20 samples vs 200 images of Fashion-MNIST test[:200]" in out and "conditional accuracy" in out


def test_generation_transform_applies_interpolation_and_crop_pct():
    from PIL import Image

    gradient = Image.fromarray(np.add.outer(np.arange(8) * 30, np.arange(8) * 2).astype(np.uint8))  # 8x8, rows differ
    def pixels(**data):
        return generation_transform(DataConfig(input_size=16, **data), hflip=0.0, training=False)(gradient)
    bicubic, nearest = pixels(), pixels(interpolation="nearest")
    assert bicubic.shape == nearest.shape == (1, 16, 16) and not torch.equal(bicubic, nearest)
    assert torch.equal(nearest[0, ::2, ::2], nearest[0, 1::2, 1::2])  # nearest doubles each pixel
    cropped = pixels(crop_pct=0.5, interpolation="nearest")  # resize to 32, keep the central 16x16
    assert torch.equal(cropped[0, ::4, ::4], nearest[0, 4:12:2, 4:12:2])


def _tiny_dit(dropout: float = 0.1):
    torch.manual_seed(0)
    model = create_dit("dit_n_4", num_classes=10, in_channels=1, input_size=28, hidden_size=32, depth=1, num_heads=2,
                       class_dropout_prob=dropout).eval()
    with torch.no_grad():  # away from adaLN-Zero's initialisation, where the label has no effect
        for param in model.parameters():
            param.normal_(std=0.2)
    return model


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number"),
    (dict(num_steps=0), "steps must be an integer from 1"),
    (dict(num_steps=-3), "steps must be an integer from 1"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(labels=torch.tensor([0, 10])), r"labels must be class indices 0..9 or sdt.tasks.sampling.UNCONDITIONAL \(-1\); got \[10\]"),
    (dict(labels=torch.tensor([11])), r"got \[11\]"),
    (dict(labels=torch.tensor([-2])), r"got \[-2\]"),
    (dict(labels=torch.tensor([0.0])), "1-D integer tensor"),
    (dict(sampler="ddim"), "does not fit the flow objective"),
])
def test_sample_images_rejects_bad_arguments(kwargs, message):
    model = _tiny_dit()
    args = dict(labels=torch.tensor([0, 1]), num_steps=1)
    args.update(kwargs)
    with pytest.raises((ConfigError, DataError), match=message):
        sample_images(model, "flow", **args)


def test_unconditional_sampling_is_explicit():
    model = _tiny_dit()
    null = sample_images(model, "flow", torch.tensor([UNCONDITIONAL, 3]), num_steps=2)
    assert null.shape == (2, 1, 28, 28)
    # sample i depends only on its own label and (seed, i)
    direct = sample_images(model, "flow", torch.tensor([0, 3]), num_steps=2)
    assert torch.equal(null[1], direct[1]) and not torch.equal(null[0], direct[0])
    no_null = _tiny_dit(dropout=0.0)
    with pytest.raises(DataError, match="no null class"):
        sample_images(no_null, "flow", torch.tensor([UNCONDITIONAL]), num_steps=1)
    with pytest.raises(DataError, match=r"class indices 0..9; got \[10\]"):
        sample_images(no_null, "flow", torch.tensor([10]), num_steps=1)
    with pytest.raises(ConfigError, match="needs a model trained with label dropout"):
        sample_images(no_null, "flow", torch.tensor([1]), num_steps=1, cfg_scale=2.0)


def test_class_labels_checks_its_arguments():
    assert class_labels(10, 2, [3, 7]).tolist() == [3, 3, 7, 7]
    assert class_labels(3, 1).tolist() == [0, 1, 2]
    for per_class in (0, -1):
        with pytest.raises(ConfigError, match="per_class"):
            class_labels(10, per_class)
    with pytest.raises(ConfigError, match=r"classes must be in 0..9"):
        class_labels(10, 1, [3, 10])


def test_cli_sample_validates_and_picks_classes(trained_run: Path, tmp_path: Path, capsys):
    base = ["sample", str(trained_run), "--out", str(tmp_path / "s"), "--threads", "1", "--steps", "1"]
    for bad, message in ((["--cfg-scale", "nan"], "cfg_scale must be a finite number"),
                         (["--steps", "0"], "steps must be an integer from 1"),
                         (["--steps", "-3"], "steps must be an integer from 1"),
                         (["--per-class", "-1"], "per_class"), (["--per-class", "0"], "per_class"),
                         (["--batch-size", "0"], "batch_size must be a positive integer"),
                         (["--classes", "0,10"], "classes must be in 0..9"),
                         (["--classes", "zero"], "--classes must be comma-separated")):
        assert main(base + bad) == 2, bad
        assert message in capsys.readouterr().err, bad
        assert not (tmp_path / "s.npz").exists()
    assert main(base + ["--classes", "0,3,-1", "--per-class", "2"]) == 0
    assert main(["sample", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a generation run (no config.yaml)" in capsys.readouterr().err
    classifier_like = tmp_path / "classifier"
    classifier_like.mkdir()
    (classifier_like / "config.yaml").write_text("model:\n  name: sdt_h_nano\naug:\n  mixup: 0.2\n")
    assert main(["sample", str(classifier_like), "--out", str(tmp_path / "x")]) == 2
    assert "is not a generation run of 'sdt gen-train'" in capsys.readouterr().err
    with np.load(tmp_path / "s.npz") as data:
        assert data["labels"].tolist() == [0, 0, 3, 3, -1, -1] and data["arr_0"].shape == (6, 28, 28, 1)


def test_gen_train_with_grad_checkpointing_matches_without(trained_run: Path, fake_fmnist: Path, tmp_path: Path):
    run = tmp_path / "ckpt"  # sdt gen-train -o engine.grad_checkpointing=true: an AttributeError once config.yaml was written
    overrides = _overrides(fake_fmnist, **{"engine.grad_checkpointing": "true"})
    assert main(["gen-train", "--output", str(run)] + [a for o in overrides for a in ("-o", o)]) == 0
    assert load_config(GenConfig, str(run / "config.yaml")).engine.grad_checkpointing
    plain, recomputed = (load_file(checkpoint_dirs(r)[-1] / "model.safetensors") for r in (trained_run, run))
    for key in plain:  # recomputing the blocks' activations changes memory, not the result
        assert torch.allclose(plain[key], recomputed[key], rtol=0, atol=1e-6), key


def test_image_grid_places_images_row_major_with_gaps():
    from sdt.engine.plots import image_grid

    images = torch.arange(1, 7, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 3).contiguous()  # image i is all i+1
    grid = image_grid(images, rows=2)
    assert grid.shape == (2 * 3 - 1, 3 * 4 - 1) and grid.dtype == np.uint8
    for i in range(6):
        r, c = divmod(i, 3)
        assert (grid[r * 3:r * 3 + 2, c * 4:c * 4 + 3] == i + 1).all()
    assert (grid[2, :] == 0).all() and (grid[:, 3] == 0).all() and (grid[:, 7] == 0).all()
    rgb = image_grid(torch.full((2, 3, 2, 2), 9, dtype=torch.uint8), rows=1)
    assert rgb.shape == (2, 5, 3) and (rgb[:, 2] == 0).all() and (rgb[:, :2] == 9).all()


def test_diffusion_settings_a_user_chooses_are_config_errors():
    """Objective, sampler and step count reach sdt.tasks.diffusion from configs and the API: each bad one is a
    ConfigError (one line from the CLI), not a bare ValueError."""
    from sdt.tasks.diffusion import create_objective

    y, noise = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="unknown objective 'score'"):
        create_objective("score")
    with pytest.raises(ConfigError, match="learn_sigma=False"):
        create_objective("flow", learn_sigma=True)
    with pytest.raises(ConfigError, match="num_steps must be in \\[1, 1000\\]"):
        create_objective("ddpm").respace(1001)
    with pytest.raises(ConfigError, match="does not fit the DDPM objective"):
        create_objective("ddpm").sample(lambda *a: a[0], noise, y, "heun", num_steps=2)
    with pytest.raises(ConfigError, match="does not fit flow matching"):
        create_objective("flow").sample(lambda *a: a[0], noise, y, "ddim", num_steps=2)
    with pytest.raises(ConfigError, match="num_steps must be >= 1"):
        create_objective("flow").sample(lambda *a: a[0], noise, y, "euler", num_steps=0)


def test_the_former_name_attn_still_loads_with_a_note(tmp_path: Path, capsys):
    """Runs and recipes from before DiT's decay was spelt as in the backbones: model.attn is read as
    model.decay (a FutureWarning), create_dit(attn=...) builds the same model, --attn sets --decay."""
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  name: dit_n_4\n  attn: fixed\n")
    with pytest.warns(FutureWarning, match="model.attn is deprecated; it is read as model.decay"):
        assert load_config(GenConfig, str(old)).model.decay == "fixed"
    with pytest.raises(ConfigError, match="set only model.decay"):
        load_config(GenConfig, None, ["model.attn=fixed", "model.decay=cag"])
    with pytest.warns(FutureWarning, match="pass decay="):
        assert create_dit("dit_n_4", attn="fixed").decay == "fixed"
    assert main(["gen-train", "--output", str(tmp_path / "run"), "--resume", "--attn", "fixed"]) == 2
    err = capsys.readouterr().err
    assert "--attn is deprecated; use --decay" in err and "drop --recipe and overrides" in err
