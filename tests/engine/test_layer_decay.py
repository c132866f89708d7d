"""engine.layer_decay: timm's layer-wise learning-rate decay over the sdt models' group_matcher layers."""
import pytest
import timm
import torch

import sdt  # noqa: F401  (registers the models)
from sdt.engine import EngineConfig
from sdt.engine.config import check_engine_settings
from sdt.engine.trainer import optimization
from sdt.errors import ConfigError


@pytest.mark.parametrize("name", ["sdt_h_nano", "sdt_vit_tiny"])
def test_layer_decay_scales_the_lr_from_the_head_down_to_the_stem(name):
    model = timm.create_model(name, num_classes=10)
    cfg = EngineConfig(layer_decay=0.5, epochs=1, warmup_epochs=0)
    optimizer, *_ = optimization(cfg, model, 1e-3, 10, torch.device("cpu"))
    scales = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    stem = next(n for n in named if n.startswith(("stem", "patch_embed")))
    head = next(n for n in named if n.startswith("head"))
    layers = len({round(s, 12) for s in scales.values()})
    assert layers > 3  # the group_matcher splits the model into its blocks, not one group
    assert scales[id(named[head])] == 1.0
    assert scales[id(named[stem])] == pytest.approx(0.5 ** (layers - 1))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_without_layer_decay_every_parameter_has_the_full_lr():
    optimizer, *_ = optimization(EngineConfig(epochs=1), timm.create_model("sdt_h_nano"), 1e-3, 10, torch.device("cpu"))
    assert all(group.get("lr_scale", 1.0) == 1.0 for group in optimizer.param_groups)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_layer_decay_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="engine.layer_decay must be in"):
        check_engine_settings(EngineConfig(layer_decay=value))
