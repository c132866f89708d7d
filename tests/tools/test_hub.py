"""Sharing weights the timm way: save_for_hf / local-dir round trips, pretrained_cfg_overlay files,
and sdt.tools.hub.export_run_to_hub for a finished training run."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import sdt  # noqa: F401  (registers the models)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh init (BN running stats too)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    return model.eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kwargs", [{}, dict(num_classes=10), dict(in_chans=1, num_classes=10), dict(in_chans=4),
                                    dict(num_classes=0)])
def test_save_for_hf_local_dir_round_trip_is_exact(tmp_path, kwargs):
    """timm's hub layout, as push_to_hf_hub writes it; ``pretrained=True`` loads the weights
    (without it timm builds the architecture from config.json with a fresh init, as for hf-hub:)."""
    model = _perturbed("sdt_h_nano", **kwargs)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    _assert_same_weights(model, loaded)
    assert loaded.num_classes == model.num_classes and loaded.in_chans == model.in_chans
    x = torch.randn(2, model.in_chans, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_overlay_file_keeps_a_10_class_head(tmp_path, in_chans):
    model = _perturbed("sdt_h_nano", num_classes=10, in_chans=in_chans)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    for extra in (dict(num_classes=10, in_chans=in_chans), {}):  # the file's head and channels are the defaults
        loaded = timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **extra)
        _assert_same_weights(model, loaded.eval())
        assert loaded.pretrained_cfg["num_classes"] == 10 and loaded.pretrained_cfg["input_size"][0] == in_chans
    torch.save(model.state_dict(), tmp_path / "weights.pth")  # a torch file works the same (weights_only)
    loaded = timm.create_model("sdt_h_nano", pretrained=True, num_classes=10, in_chans=in_chans,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.pth")))
    _assert_same_weights(model, loaded.eval())
    loaded = timm.create_model("sdt_h_nano", pretrained=True, num_classes=10, in_chans=in_chans,
                               pretrained_cfg_overlay=dict(state_dict=model.state_dict()))
    _assert_same_weights(model, loaded.eval())


def test_overlay_file_with_other_num_classes_resets_only_the_head(tmp_path):
    """Fine-tuning: another num_classes keeps the body and builds a fresh head, with a warning."""
    model = _perturbed("sdt_h_nano", num_classes=10)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.warns(UserWarning, match="10-class head.*num_classes=10"):
        loaded = timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   num_classes=5)
    assert loaded.num_classes == 5
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    for k, v in body.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_overlay_file_that_is_not_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------------------------------------
# export_run_to_hub: a finished (seconds-long) training run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import tiny_overrides, write_fake_fashion_mnist
    from sdt.cli import main

    root = tmp_path_factory.mktemp("hub_run")
    data = write_fake_fashion_mnist(root / "fmnist")
    run = root / "run"
    overrides = tiny_overrides(data, **{"engine.epochs": "1", "data.crop_pct": "0.875",
                                        "data.interpolation": "bilinear"})
    assert main(["train", "--recipe", "quick", "--output", str(run)] + [a for o in overrides for a in ("-o", o)]) == 0
    return run


def _run_model(run):
    from sdt.files import load_weights
    from sdt.engine import load_config
    from sdt.tasks.classify import TrainConfig, create_model

    cfg = load_config(TrainConfig, str(run / "config.yaml"))
    model = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
    model.load_state_dict(load_weights(run / "best.safetensors"))
    return cfg, model.eval()


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_run_loads_bit_for_bit_with_the_runs_preprocessing(finished_run, tmp_path):
    import json

    from PIL import Image

    from sdt.data import FASHION_MNIST_CLASSES, build_transform
    from sdt.tools.hub import HUB_FILES, export_run_to_hub, is_hub_dir, load_hub_model

    out = export_run_to_hub(finished_run, tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES) and is_hub_dir(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    cfg, run_model = _run_model(finished_run)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    _assert_same_weights(run_model, loaded)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), run_model(x))

    config = json.loads((out / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    assert config["architecture"] == "sdt_h_nano" and config["num_classes"] == 10
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["embed_dims"] == [8, 16, 16, 16]
    assert tuple(config["label_names"]) == FASHION_MNIST_CLASSES
    assert tuple(loaded.pretrained_cfg["label_names"]) == FASHION_MNIST_CLASSES
    assert pcfg["input_size"] == [1, 16, 16] and pcfg["num_classes"] == 10
    assert (pcfg["crop_pct"], pcfg["crop_mode"], pcfg["interpolation"]) == (0.875, "center", "bilinear")
    assert (pcfg["mean"], pcfg["std"]) == ([0.286], [0.353])  # Fashion-MNIST's, as the run normalised

    # timm's data config of the loaded model rebuilds the run's own evaluation transform
    hub_model, data_config = load_hub_model(out)
    _assert_same_weights(run_model, hub_model)
    hub_transform = timm.data.create_transform(**data_config)
    run_transform = build_transform(cfg.data, None, cfg.model.in_chans)
    image = Image.fromarray(torch.randint(0, 255, (40, 33), dtype=torch.uint8).numpy(), mode="L")
    assert torch.equal(hub_transform(image), run_transform(image))

    summary = json.loads((finished_run / "summary.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    assert f"{summary['test']['top1']:.2f}%" in card and f"{summary['best']['value']:.2f}%" in card
    assert "t-shirt/top" in card and "pretrained=True" in card


def test_export_refuses_a_non_empty_folder_unless_overwrite(finished_run, tmp_path):
    from sdt.errors import ConfigError
    from sdt.tools.hub import export_run_to_hub

    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files.*overwrite"):
        export_run_to_hub(finished_run, out)
    assert _snapshot(out) == {"notes.txt": b"mine"}
    export_run_to_hub(finished_run, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    (tmp_path / "empty").mkdir()
    export_run_to_hub(finished_run, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(ConfigError, match="inside the run folder"):
        export_run_to_hub(finished_run, finished_run / "hub")


def test_export_failure_leaves_nothing_half_written(finished_run, tmp_path, monkeypatch):
    import sdt.tools.hub
    from sdt.tools.hub import export_run_to_hub

    export_run_to_hub(finished_run, tmp_path / "hub")
    before = _snapshot(tmp_path / "hub")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sdt.tools.hub, "generate_readme", crash)  # after the weights and config.json are written
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "hub", True)):
        with pytest.raises(RuntimeError, match="disk full"):
            export_run_to_hub(finished_run, target, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert _snapshot(tmp_path / "hub") == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temp folders


def test_export_refuses_an_unfinished_or_busy_run(finished_run, tmp_path):
    import shutil
    import subprocess
    import sys

    from sdt.errors import ConfigError
    from sdt.tools.hub import export_run_to_hub

    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(ConfigError, match="not a finished sdt train run.*summary.json"):
        export_run_to_hub(unfinished, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()

    busy = tmp_path / "busy"
    shutil.copytree(finished_run, busy)
    # another process trains in it: a child process holds the run's lock
    code = ("import sys, time; from pathlib import Path; from sdt.engine import lock_run_folder; "
            "lock_run_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="in use by another sdt run"):
            export_run_to_hub(busy, tmp_path / "hub")
        assert not (tmp_path / "hub").exists()
    finally:
        holder.kill()
        holder.wait()


def test_export_of_a_folder_run_names_classes_from_its_folders(finished_run, tmp_path):
    """An image-folder run takes its label names from the training folder; when the folder is gone,
    the error says to pass them, and passed names are used."""
    import json
    import shutil

    import yaml
    from PIL import Image

    from sdt.errors import ConfigError
    from sdt.tools.hub import export_run_to_hub

    data = tmp_path / "images"
    classes = ["cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lynx"]
    for name in classes:
        (data / "train" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(data / "train" / name / "a.png")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].update(dataset="folder", data_dir=str(data))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = export_run_to_hub(run, tmp_path / "hub")
    assert json.loads((out / "config.json").read_text())["label_names"] == classes
    shutil.rmtree(data)
    with pytest.raises(ConfigError, match="pass label_names"):
        export_run_to_hub(run, tmp_path / "hub2")
    out = export_run_to_hub(run, tmp_path / "hub2", label_names=[c.upper() for c in classes])
    assert json.loads((out / "config.json").read_text())["label_names"] == [c.upper() for c in classes]
    with pytest.raises(ConfigError, match="3 label names for a 10-class model"):
        export_run_to_hub(run, tmp_path / "hub3", label_names=["a", "b", "c"])


def test_sdt_eval_of_an_exported_run_matches_eval_of_the_run(finished_run, tmp_path, capsys):
    """`sdt export-hub` then `sdt eval HUB`: the hub folder's config.json gives the model, the
    transform and the label names; the result is that of `sdt eval RUN` (same weights, same images)."""
    import json

    import yaml

    from sdt.cli import main
    from sdt.data import FASHION_MNIST_CLASSES

    hub = tmp_path / "hub"
    assert main(["export-hub", str(finished_run), "--output", str(hub)]) == 0
    assert "wrote" in capsys.readouterr().out
    data_dir = yaml.safe_load((finished_run / "config.yaml").read_text())["data"]["data_dir"]
    assert main(["eval", str(finished_run), "--output", str(tmp_path / "run-eval")]) == 0
    assert main(["eval", str(hub), "--data-dir", data_dir, "--output", str(tmp_path / "hub-eval")]) == 0
    run_eval, hub_eval = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("run-eval", "hub-eval"))
    assert hub_eval["images"] == run_eval["images"] == 60
    assert hub_eval["top1"] == run_eval["top1"] and hub_eval["confusion"] == run_eval["confusion"]
    assert hub_eval["loss"] == run_eval["loss"] and hub_eval["top5"] == run_eval["top5"]  # the same logits
    assert hub_eval["model"] == "sdt_h_nano" and tuple(hub_eval["per_class"]) == FASHION_MNIST_CLASSES
    assert main(["eval", str(hub), "--data-dir", data_dir, "--input-size", "1", "20", "20", "--output", str(tmp_path / "e20")]) == 0
    assert json.loads((tmp_path / "e20" / "eval.json").read_text())["input_size"] == 20
    capsys.readouterr()
    assert main(["eval", str(hub), "--data-dir", data_dir, "--input-size", "3", "20", "20"]) == 2
    err = capsys.readouterr().err
    assert "asks for 3 input channels, but sdt_h_nano here takes 1" in err and "--input-size 1 N N" in err

    assert main(["eval", str(hub), "--model", "sdt_h_tiny"]) == 2
    assert "hub folder" in capsys.readouterr().err
    assert main(["export-hub", str(finished_run), str(hub)]) == 2  # the old positional spelling: not empty, no --overwrite
    err = capsys.readouterr().err
    assert "already holds files" in err and "Traceback" not in err and "positional is deprecated; use --output" in err
    assert main(["export-hub", str(finished_run)]) == 2
    assert "--output FOLDER" in capsys.readouterr().err
    assert main(["export-hub", str(finished_run), str(hub), "--output", str(hub)]) == 2
    assert "two outputs" in capsys.readouterr().err
    assert main(["export-hub", str(finished_run), "--output", str(hub), "--overwrite", "--label-names", "a,b"]) == 2
    assert "2 label names for a 10-class model" in capsys.readouterr().err
    assert main(["export-hub", str(tmp_path / "nope"), "--output", str(tmp_path / "h2")]) == 2
    assert "not a finished sdt train run" in capsys.readouterr().err
