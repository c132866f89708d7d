"""One meaning per flag, timm's names: -o is --override everywhere, outputs are --output (old spellings
still work, with a note), shortcut flags equal their -o keys, --version, --img-size / --crop-pct of eval,
and sample/fid leave the thread count to PyTorch."""
import json

import pytest
import timm
import torch

from sdt.cli import build_parser, main
from sdt.cli.common import _recipe_and_overrides
from sdt.files import save_weights
from sdt.tasks import TrainConfig


def test_version_and_help_list_predict(capsys):
    import sdt

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sdt {sdt.__version__}"
    build_parser().print_help()
    assert "predict" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["export", "sdt_h_nano"], ["convert", "w.pth", "--model", "sdt_h_nano"],
                                     ["viz"]])
def test_dash_o_is_not_an_output(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command + ["-o", "out.file"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "-o means --override" in err and "--output out.file" in err


def test_dash_o_message_points_to_output(capsys):
    with pytest.raises(SystemExit):
        main(["export", "sdt_h_nano", "-o", "m.onnx"])
    err = capsys.readouterr().err
    assert "-o means --override" in err and "--output m.onnx" in err
    assert main(["train", "--recipe", "quick", "-o", "runs/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes section.key=value" in err[0] and "--output runs/x" in err[0]


def test_shortcut_flags_equal_their_override_keys():
    parser = build_parser()
    args = parser.parse_args(["train", "--recipe", "quick", "--lr", "2e-3", "--seed", "7", "--amp", "bf16",
                              "--workers", "0", "--device", "cpu", "--epochs", "3", "--batch-size", "32"])
    by_flags = _recipe_and_overrides(args, args.flags, TrainConfig, None)
    args = parser.parse_args(["train", "--recipe", "quick", "-o", "engine.lr=2e-3", "-o", "engine.seed=7",
                              "-o", "engine.amp=bf16", "-o", "data.workers=0", "-o", "engine.device=cpu",
                              "-o", "engine.epochs=3", "-o", "engine.batch_size=32"])
    assert by_flags == _recipe_and_overrides(args, args.flags, TrainConfig, None)
    assert (by_flags.engine.lr, by_flags.engine.seed, by_flags.engine.amp, by_flags.data.workers,
            by_flags.engine.device) == (2e-3, 7, "bf16", 0, "cpu")
    for command in ("gen-train", "detect", "segment"):
        assert parser.parse_args([command, "--lr", "1e-4", "--seed", "3"]).lr == 1e-4


def test_old_spellings_work_with_a_note(capsys):
    parser = build_parser()
    args = parser.parse_args(["sample", "run", "--out", "s", "--weights", "best"])
    assert (args.output, args.weights_from) == ("s", "best")
    err = capsys.readouterr().err
    assert "--out is deprecated; use --output" in err and "--weights is deprecated; use --weights-from" in err
    args = parser.parse_args(["sample", "run", "--output", "s", "--weights-from", "model"])
    assert (args.output, args.weights_from, args.threads) == ("s", "model", None)
    assert parser.parse_args(["viz", "--out-dir", "maps"]).output == "maps"
    assert "--out-dir is deprecated" in capsys.readouterr().err
    assert parser.parse_args(["fid", "s.npz"]).threads is None


@pytest.mark.parametrize("argv, expected", [
    (["--input-size", "1", "20", "20"], (1, (20, 20))),
    (["--img-size", "20"], (None, (20, 20))),
    ([], (None, None)),
])
def test_input_size_means_c_h_w_in_eval_as_in_export_and_models(argv, expected, capsys):
    from sdt.cli.common import input_size

    args = build_parser().parse_args(["eval", "run", *argv])
    assert input_size(args, "eval", "N") == expected
    assert capsys.readouterr().err == ""


def test_the_old_one_number_input_size_of_eval_still_works_with_a_note(capsys):
    from sdt.cli.common import input_size

    assert input_size(build_parser().parse_args(["eval", "run", "--input-size", "20"]), "eval", "N") == (None, (20, 20))
    assert "--input-size N is deprecated; use --input-size C H W or --img-size N" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "1", "20"], "--input-size takes three positive numbers C H W"),
    (["--input-size", "1", "0", "20"], "--input-size takes three positive numbers C H W"),
    (["--input-size", "1", "20", "20", "--img-size", "20"], "not both"),
    (["--input-size", "1", "20", "24"], "evaluation runs at a square size"),
])
def test_eval_input_size_errors_name_the_fix(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval", "run", *argv])


def test_sample_and_fid_take_the_gpu_when_there_is_one(monkeypatch, tmp_path):
    """device auto: sdt sample moves the generator to the device setup_distributed picks (CUDA when available)."""
    import sdt.tools.sample as sample_tool
    from sdt.engine.dist import DistInfo

    parser = build_parser()
    assert parser.parse_args(["sample", "run", "--output", "s"]).device == "auto"
    assert parser.parse_args(["fid", "s.npz"]).device == "auto"
    moved = []

    class Generator(torch.nn.Module):
        def to(self, device):
            moved.append(device)
            raise RuntimeError("stop here")

    monkeypatch.setattr(sample_tool, "load_generator", lambda run, weights: (Generator(), None))
    monkeypatch.setattr(sample_tool, "setup_distributed", lambda name: DistInfo(device=torch.device("meta")))
    with pytest.raises(RuntimeError, match="stop here"):
        sample_tool.sample_command("run", str(tmp_path / "s"))
    assert moved == [torch.device("meta")]


def test_inception_fid_runs_on_the_device_it_is_given(monkeypatch):
    """--inception-weights with --device cuda: the Inception metric goes to that device (it stayed on the CPU)."""
    import sdt.tools.fid as fid_tool

    moved = []

    class Metric:
        def to(self, device):
            moved.append(device)
            raise RuntimeError("stop here")

    monkeypatch.setattr(fid_tool, "inception_fid", lambda weights: Metric())
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="stop here"):
        fid_tool.compute_fids([images], images, "ref", inception_weights="w.pth", device=torch.device("meta"))
    with pytest.raises(RuntimeError, match="stop here"):
        fid_tool.compute_fids([images], images, "ref", inception_weights="w.pth")
    assert moved == [torch.device("meta"), torch.device("cpu")]


def test_eval_of_a_bare_weights_file_takes_the_models_pretrained_cfg(fake_fmnist, tmp_path):
    """sdt_h_nano's pretrained cfg is 64 px (crop 1.0): a weights file outside a run is evaluated at 64, not 28."""
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(weights, timm.create_model("sdt_h_nano", num_classes=10, in_chans=1).state_dict())
    common = ["eval", str(weights), "--model", "sdt_h_nano", "--data-dir", str(fake_fmnist), "--batch-size", "64"]
    assert main(common + ["--output", str(tmp_path / "a")]) == 0
    full = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert full["input_size"] == 64
    assert main(common + ["--crop-pct", "0.5", "--output", str(tmp_path / "b")]) == 0
    cropped = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert cropped["input_size"] == 64 and cropped["loss"] != full["loss"]
