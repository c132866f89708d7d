"""The sdt command's handling of bad input: every setting checked before anything is written,
misspelled model names answered with suggestions, our errors in one line, bugs with a traceback."""
from pathlib import Path
from typing import List

import pytest
import timm
from timm.models import register_model
from torch import nn

from conftest import tiny_overrides
from sdt import cli
from sdt.cli import main


def _train(run: Path, data: Path, *extra: str, overrides: List[str] = ()) -> int:
    tiny = [a for o in tiny_overrides(data, **dict(o.split("=", 1) for o in overrides)) for a in ("-o", o)]
    return main(["train", "--recipe", "quick", "--output", str(run), *tiny, *extra])  # the last value of a key wins


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "engine.epochs must be at least 1, got 0"),
    (["--epochs", "-1"], "engine.epochs must be at least 1, got -1"),
    (["--batch-size", "0"], "engine.batch_size must be at least 1"),
    (["--batch-size", "-4"], "engine.batch_size must be at least 1"),
    (["-o", "engine.lr=-1"], "engine.lr must be a positive number"),
    (["-o", "engine.sched=cosinus"], "engine.sched must be one of cosine"),
    (["-o", "engine.opt=adamx"], "engine.opt must be a timm optimizer name"),
    (["-o", "engine.ema_decay=1.5"], "engine.ema_decay must be in (0, 1)"),
    (["-o", "engine.grad_accum_steps=0"], "engine.grad_accum_steps must be at least 1"),
    (["-o", "engine.grad_accum_steps=3"], "divisible by the number of processes (1) x engine.grad_accum_steps (3)"),
    (["-o", "engine.keep_checkpoints=0"], "engine.keep_checkpoints must be at least 1"),
    (["-o", "data.crop_pct=0"], "data.crop_pct must be in (0, 1]"),
    (["-o", "data.interpolation=cubic"], "data.interpolation must be one of bicubic"),
    (["-o", "data.workers=-1"], "data.workers must be >= 0"),
    (["-o", "aug.reprob=2"], "aug.reprob must be a probability in [0, 1]"),
    (["-o", "aug.scale=[0.9, 0.1]"], "aug.scale must be [min, max]"),
    (["-o", "model.num_classes=0"], "model.num_classes must be at least 1"),
    (["--model", "sdt_h_nan"], "unknown model 'sdt_h_nan'; did you mean sdt_h_nano"),
    (["-o", "model.kwargs={depthz: 3}"], "model.kwargs {'depthz': 3} do not fit sdt_h_nano"),
    (["-o", "model.kwargs={decay: nope}"], "sdt_h_nano with model.kwargs {'decay': 'nope'}: unknown decay 'nope'"),
])
def test_bad_settings_fail_before_the_run_folder_exists(fake_fmnist: Path, tmp_path: Path, capsys, flags, message):
    run = tmp_path / "run"
    assert _train(run, fake_fmnist, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not run.exists()


def test_a_failed_start_leaves_nothing_so_a_rerun_works(fake_fmnist: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert _train(run, fake_fmnist, "--epochs", "0") == 2
    assert not run.exists()
    assert _train(run, fake_fmnist, overrides=["engine.epochs=1"]) == 0
    assert (run / "report.md").is_file()


class _NoGradCheckpointing(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, **kwargs):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.head(x)


@register_model
def _sdt_test_no_grad_checkpointing(pretrained: bool = False, **kwargs) -> nn.Module:
    return _NoGradCheckpointing(**{k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans")})


def test_grad_checkpointing_on_a_model_without_it_is_refused_before_writing(fake_fmnist: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert _train(run, fake_fmnist, "--model", "_sdt_test_no_grad_checkpointing",
                  overrides=["engine.grad_checkpointing=true", "model.drop_path_rate=null", "model.kwargs={}"]) == 2
    assert "_NoGradCheckpointing has no set_grad_checkpointing(); set engine.grad_checkpointing=false" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("args", [
    ["models", "sdt_h_tinny"],
    ["export", "sdt_h_tinny", "--output", "never.onnx"],
    ["viz", "--model", "sdt_h_tinny"],
    ["convert", "x.pth", "--model", "sdt_h_tinny", "--output", "never.safetensors"],
])
def test_misspelled_model_names_get_suggestions_in_every_command(args, capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown model 'sdt_h_tinny'; did you mean sdt_h_tiny" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_an_empty_image_folder_is_one_clear_error(tmp_path: Path, capsys):
    for split in ("train", "val"):
        (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
    assert main(["train", "--recipe", "quick", "--output", str(tmp_path / "run"), "-o", "data.dataset=folder",
                 "--data-dir", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert "the 'train' folder" in err and "holds no images (.png, .jpg, .jpeg)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_our_errors_are_one_line_bugs_keep_their_traceback_and_debug_shows_all(monkeypatch, capsys):
    assert main(["train", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    from sdt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe"):
        main(["--debug", "train", "--recipe", "nope"])
    with pytest.raises(ConfigError, match="unknown recipe"):
        main(["train", "--recipe", "nope", "--debug"])

    def buggy(args):
        raise ValueError("a bug inside sdt")

    monkeypatch.setattr(cli.common, "run_task", buggy)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "train", buggy))
    with pytest.raises(ValueError, match="a bug inside sdt"):  # not swallowed into one line
        main(["train", "--recipe", "quick"])


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


def test_every_registered_model_name_passes_the_check():
    from sdt.models.registry import check_model_name

    for name in timm.list_models("sdt_*") + timm.list_models("rmt_*") + ["sdt_h_nano.fmnist", "local-dir:/x"]:
        check_model_name(name)


def test_models_table_counts_on_the_meta_device_with_progress(capsys):
    assert main(["models", "sdt_h_nano", "rmt_nano"]) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["sdt_h_nano", "rmt_nano"]
    nano = timm.create_model("sdt_h_nano", num_classes=1000)
    assert f"| {sum(p.numel() for p in nano.parameters()):,} |" in rows[0]  # the same count as a real model
    assert "counting FLOPs" in err and "2/2" in err


def test_cli_choices_defaults_and_recipe_help_come_from_the_library():
    from sdt.engine.config import available_recipes, load_config
    from sdt.data import DATASETS
    from sdt.decay import DECAY_VARIANTS
    from sdt.tasks.diffusion import OBJECTIVES
    from sdt.tools.fid import DEFAULT_EXTRACTOR
    from sdt.tasks.classify import TrainConfig

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, cli.argparse._SubParsersAction)).choices
    options = {name: {a.dest: a for a in p._actions} for name, p in commands.items()}
    gen = options["gen-train"]
    assert set(DECAY_VARIANTS) <= set(gen["decay"].choices) and tuple(gen["objective"].choices) == OBJECTIVES
    assert tuple(gen["dataset"].choices) == DATASETS == tuple(options["eval"]["dataset"].choices)
    assert DEFAULT_EXTRACTOR in options["fid"]["extractor"].help
    def listed(command: str) -> List[str]:
        return options[command]["recipe"].help.split("(")[1].split(")")[0].split(", ")

    train_recipes = []
    for recipe in available_recipes():  # every shipped classification recipe, and only those, in train's help
        try:
            load_config(TrainConfig, recipe)
            train_recipes.append(recipe)
        except ValueError:
            pass
    assert {"quick", "fashion-mnist", "imagenet"} <= set(train_recipes) and listed("train") == train_recipes
    assert "gen-fashion-mnist" in listed("gen-train") and not set(listed("gen-train")) & set(train_recipes)
