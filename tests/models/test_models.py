"""SDT-H and RMT models: parity with RMT's released code, timm behaviour, shapes."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sdt
from sdt.models.sdt_h import SpatialDecayTransformer, checkpoint_filter_fn, rmt_config_to_kwargs

FIXTURES = Path(__file__).parents[1] / "fixtures" / "rmt"
SMALL_MODELS = ["sdt_h_nano", "rmt_nano"]


@pytest.fixture(scope="module")
def rmt_fixture():
    config = json.loads((FIXTURES / "rmt_small.json").read_text())
    return config, load_file(FIXTURES / "rmt_small.safetensors"), load_file(FIXTURES / "rmt_small_io.safetensors")


def _fixture_model(config, **overrides) -> SpatialDecayTransformer:
    return SpatialDecayTransformer(**{**rmt_config_to_kwargs(config["constructor_kwargs"]), **overrides})


def _load(model, state_dict):
    result = model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def test_rmt_parity_with_released_code(rmt_fixture):
    config, weights, io = rmt_fixture
    model = _load(_fixture_model(config), weights)
    assert sum(p.numel() for p in model.parameters()) == config["n_params"]
    for size in ("64x64", "96x80"):
        with torch.no_grad():
            logits = model(io[f"input_{size}"])
        assert torch.allclose(logits, io[f"logits_{size}"], atol=1e-4, rtol=0), size
        # The logits are small (|x| ~ 0.03): hold them to a relative standard too.
        assert (logits - io[f"logits_{size}"]).abs().max() < 1e-3 * io[f"logits_{size}"].abs().max()


def test_rmt_checkpoint_with_model_wrapper_loads(rmt_fixture):
    config, weights, io = rmt_fixture
    model = _load(_fixture_model(config), {"model": weights, "epoch": 3})
    with torch.no_grad():
        assert torch.allclose(model(io["input_64x64"]), io["logits_64x64"], atol=1e-4)


def test_sdt_from_rmt_weights_reproduces_rmt(rmt_fixture):
    """Same layout, RMT weights through the filter: the gate starts exactly at RMT's decay."""
    config, weights, io = rmt_fixture
    sdt_model = _load(_fixture_model(config, decay="cag"), weights)
    with torch.no_grad():
        assert torch.allclose(sdt_model(io["input_96x80"]), io["logits_96x80"], atol=1e-4)


def test_filter_rejects_wrong_decay_config(rmt_fixture):
    config, weights, _ = rmt_fixture
    model = _fixture_model(config, heads_ranges=3)
    with pytest.raises(ValueError, match="does not match this model's decay rates"):
        checkpoint_filter_fn(weights, model)


@pytest.mark.parametrize("size", ["nano", "tiny"])
def test_sdt_at_init_equals_rmt_then_diverges(size):
    torch.manual_seed(0)
    rmt = timm.create_model(f"rmt_{size}", num_classes=10, layouts=sdt.models.sdt_h.SDT_H_LAYOUTS).eval()
    model = timm.create_model(f"sdt_h_{size}", num_classes=10).eval()
    model.load_state_dict(checkpoint_filter_fn(rmt.state_dict(), model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), rmt(x), atol=1e-5, rtol=0)

    model.train()
    gate_params = [p for n, p in model.named_parameters() if ".gate." in n]
    optimizer = torch.optim.SGD(gate_params, lr=1.0)
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in gate_params)
    assert sum(p.grad.abs().sum() for p in gate_params if p.ndim == 2) > 0  # W_g gets gradient
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x) - rmt(x)).abs().max() > 1e-4


@pytest.mark.parametrize("name,expected", [
    ("rmt_tiny", 14_334_216), ("rmt_small", 26_967_240), ("rmt_base", 54_154_896), ("rmt_large", 95_464_864)])
def test_exact_rmt_parameter_counts(name, expected):
    rmt = timm.create_model(name)
    assert sum(p.numel() for p in rmt.parameters()) == expected
    cag = timm.create_model(name.replace("rmt_", "sdt_h_"))
    gate = sum(p.numel() for n, p in cag.named_parameters() if ".gate." in n)
    # gate per block: W_g (n x C) + bias (n) + alpha (n)
    expected_gate = sum(
        (stage.blocks[0].attn.gate.num_heads * (dim + 2)) * len(stage.blocks)
        for stage, dim in zip(cag.stages, [f["num_chs"] for f in cag.feature_info]))
    assert gate == expected_gate
    assert sum(p.numel() for p in cag.parameters()) == expected + gate


def test_every_family_member_is_registered():
    names = timm.list_models("sdt_h_*") + timm.list_models("rmt_*")
    for size in ("nano", "tiny", "small", "base", "large"):
        assert f"sdt_h_{size}" in names and f"rmt_{size}" in names


@pytest.mark.parametrize("name", ["sdt_h_tiny", "rmt_tiny"])
@pytest.mark.parametrize("shape", [(224, 224), (160, 192)])
def test_forward_backward_tiny(name, shape):
    model = timm.create_model(name, num_classes=7)
    out = model(torch.randn(1, 3, *shape))
    assert out.shape == (1, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{f}_{s}" for f in ("sdt_h", "rmt") for s in ("small", "base", "large")])
@pytest.mark.parametrize("shape", [(224, 224), (160, 192)])
def test_forward_backward_large_models(name, shape):
    model = timm.create_model(name, num_classes=5)
    out = model(torch.randn(1, 3, *shape))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("shape", [(28, 28), (33, 47), (64, 64), (1, 5)])
def test_nano_any_input_size_and_channels(name, shape):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", SMALL_MODELS + ["sdt_h_tiny"])
def test_features_only_default_and_getter(name):
    stride = 2 if "nano" in name else 4
    x = torch.randn(1, 3, 64, 96)
    for kwargs in ({}, {"feature_cls": "getter"}):
        model = timm.create_model(name, features_only=True, **kwargs)
        feats = model(x)
        assert len(feats) == 4
        assert model.feature_info.reduction() == [stride * 2 ** i for i in range(4)]
        for f, chs, red in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
            # the default path returns the model's NHWC layout, the getter NCHW, like timm's MambaOut
            c_dim = -1 if not kwargs else 1
            assert f.shape[c_dim] == chs
            spatial = f.shape[1:3] if not kwargs else f.shape[2:4]
            assert tuple(spatial) == (-(-64 // red), -(-96 // red))


def test_timm_api_surface():
    model = timm.create_model("sdt_h_nano", num_classes=10).eval()
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.conv.0" and cfg["classifier"] == "head.fc"
    assert dict(model.named_modules())[cfg["first_conv"]].in_channels == 3
    assert dict(model.named_modules())[cfg["classifier"]].out_features == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 4, 4, model.num_features)
        assert tuple(feats.shape[1:3]) == cfg["pool_size"]
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert torch.allclose(model.head.fc(pre), model(x), atol=1e-6)

        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4 and torch.allclose(final, feats)
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NHWC")
        assert len(only) == 1 and only[0].shape[-1] == model.feature_info[1]["num_chs"]

    assert model.get_classifier().out_features == 10
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0, "")
    out = model(x)
    assert out.shape == (2, 4, 4, model.head.proj.out_features)  # unpooled NHWC map
    model.reset_classifier(5, "avg")
    assert model(x).shape == (2, 5)

    assert model.group_matcher()["stem"] == r"^stem"
    assert all(n.endswith(("gate.bias", "gate.alpha")) for n in model.no_weight_decay())
    assert len(model.no_weight_decay()) == 2 * sum(len(s.blocks) for s in model.stages)


def test_prune_intermediate_layers():
    model = timm.create_model("sdt_h_nano").eval()
    kept = model.prune_intermediate_layers([0, 1])
    assert list(kept) == [0, 1] and len(model.stages) == 2
    inter = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [f.shape[1] for f in inter] == [32, 64]


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano", num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_torchscript_matches_eager(name):
    model = timm.create_model(name, num_classes=10).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 36, 28)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_fx_feature_extraction():
    from timm.models._features_fx import create_feature_extractor

    model = timm.create_model("sdt_h_nano", num_classes=10).eval()
    extractor = create_feature_extractor(model, return_nodes={"stages.2": "s2", "head.fc": "logits"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        assert torch.allclose(out["logits"], model(x), atol=1e-6)
    assert out["s2"].shape == (1, 4, 4, 128)


def test_finite_under_bf16_autocast():
    model = timm.create_model("sdt_h_nano", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sdt.DecayGate) and m.weight is not None:
                m.weight.normal_(std=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="even size"):
        SpatialDecayTransformer(embed_dims=(30, 60, 120, 240), num_heads=(4, 4, 8, 16))
    with pytest.raises(ValueError, match="unknown decay"):
        timm.create_model("sdt_h_nano", decay="gaussian")
    with pytest.raises(ValueError, match="unknown layout"):
        timm.create_model("sdt_h_nano", layouts="windowed")
    with pytest.raises(ValueError, match="3 entries but the model has 4 stages"):
        timm.create_model("sdt_h_nano", layouts=("full",) * 3)
