from pathlib import Path

import pytest

from sdt.engine.config import available_recipes, load_config, save_config
from sdt.errors import ConfigError
from sdt.tasks.classify import TrainConfig


def test_recipes_load_and_round_trip(tmp_path: Path):
    assert {"quick", "fashion-mnist", "imagenet"} <= set(available_recipes())
    for name in ("quick", "fashion-mnist", "imagenet"):
        cfg = load_config(TrainConfig, name)
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(TrainConfig, str(tmp_path / f"{name}.yaml")) == cfg


def test_overrides_are_typed():
    cfg = load_config(TrainConfig, "quick", ["engine.epochs=7", "engine.lr=2e-3", "aug.scale=[0.5, 1]", "model.name=rmt_nano"])
    assert cfg.engine.epochs == 7 and cfg.engine.lr == 2e-3 and cfg.aug.scale == (0.5, 1.0) and cfg.model.name == "rmt_nano"
    imagenet = load_config(TrainConfig, "imagenet")
    assert imagenet.engine.lr == 5e-4 and imagenet.aug.mixup == 0.8 and imagenet.engine.ema_decay == 0.99996


@pytest.mark.parametrize("override, message", [
    ("engine.epoch=3", "unknown config key(s) engine.epoch"),
    ("engine.epochs=three", "engine.epochs: expected int"),
    ("engine.amp=true", "engine.amp: expected str"),
    ("epochs", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TrainConfig, "quick", [override])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*quick"):
        load_config(TrainConfig, "nope")
