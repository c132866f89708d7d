"""engine.lr_scale: a factor on the lr of the parameters whose names match a pattern (issue 33's gate lr)."""
import pytest
import timm
import torch

import sdt  # noqa: F401  (registers the models)
from sdt.engine import EngineConfig
from sdt.engine.config import check_engine_settings, load_config
from sdt.engine.trainer import optimization
from sdt.errors import ConfigError


def lrs_by_name(cfg: EngineConfig, model: torch.nn.Module):
    optimizer, scheduler, *_ = optimization(cfg, model, 1e-3, 10, torch.device("cpu"))
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    wd = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    return {n: lr[id(p)] for n, p in model.named_parameters()}, {n: wd[id(p)] for n, p in model.named_parameters()}, \
        optimizer, scheduler


def test_matching_parameters_get_the_factor_and_keep_their_weight_decay():
    model = timm.create_model("sdt_vit_fm_tiny", decay="cag")
    base_lr, base_wd, *_ = lrs_by_name(EngineConfig(epochs=1, warmup_epochs=0), model)
    lr, wd, optimizer, scheduler = lrs_by_name(EngineConfig(epochs=1, warmup_epochs=0, lr_scale={"*gate*": 10.0}), model)
    gates = [n for n in lr if ".gate." in n]
    assert len(gates) == 18  # W_g, b and alpha of 6 blocks
    for name in lr:
        assert lr[name] == pytest.approx(base_lr[name] * (10 if name in gates else 1)), name
    assert wd == base_wd  # W_g keeps weight decay, b and alpha (1-d) stay without
    scheduler.step_update(5)  # the schedule moves every group and keeps the factor
    after = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert after[id(named["blocks.0.attn.gate.weight"])] == pytest.approx(10 * after[id(named["blocks.0.attn.q.weight"])])


def test_lr_scale_combines_with_layer_decay():
    model = timm.create_model("sdt_vit_fm_tiny", decay="cag")
    decayed, *_ = lrs_by_name(EngineConfig(epochs=1, warmup_epochs=0, layer_decay=0.5), model)
    both, *_ = lrs_by_name(EngineConfig(epochs=1, warmup_epochs=0, layer_decay=0.5, lr_scale={"blocks.2.*": 3.0}), model)
    for name in both:
        assert both[name] == pytest.approx(decayed[name] * (3 if name.startswith("blocks.2.") else 1)), name


def test_the_first_matching_pattern_wins():
    model = timm.create_model("sdt_vit_fm_tiny", decay="cag")
    lr, *_ = lrs_by_name(EngineConfig(epochs=1, warmup_epochs=0, lr_scale={"*gate.bias": 2.0, "*gate*": 10.0}), model)
    assert lr["blocks.0.attn.gate.bias"] == pytest.approx(2 * lr["blocks.0.attn.q.weight"])
    assert lr["blocks.0.attn.gate.weight"] == pytest.approx(10 * lr["blocks.0.attn.q.weight"])


def test_a_pattern_that_matches_nothing_names_itself_and_an_example():
    with pytest.raises(ConfigError, match=r"'\*gates\*' match no parameter.*'patch_embed"):
        optimization(EngineConfig(lr_scale={"*gates*": 10.0}), timm.create_model("sdt_vit_fm_tiny"), 1e-3, 10,
                     torch.device("cpu"))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "ten"])
def test_a_factor_that_is_not_positive_is_a_config_error(value):
    with pytest.raises(ConfigError, match="engine.lr_scale must be a mapping"):
        check_engine_settings(EngineConfig(lr_scale={"*gate*": value}))


def test_the_override_reads_as_yaml_or_dotted():
    from dataclasses import dataclass, field

    @dataclass
    class Wrapper:
        engine: EngineConfig = field(default_factory=EngineConfig)

    assert load_config(Wrapper, None, ['engine.lr_scale={"*gate*": 10}']).engine.lr_scale == {"*gate*": 10}
    assert load_config(Wrapper, None, ["engine.lr_scale.*gate*=10"]).engine.lr_scale == {"*gate*": 10}
