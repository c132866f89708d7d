"""What timm's own model test suite (tests/test_models.py of timm 1.0.31) checks, for every registered
SDT-H, RMT and SDT-ViT model: forward and backward at the cfg's sizes, the default cfg's fields, features_only
with each feature class, forward_intermediates, fx forward and backward through timm's feature
extraction, TorchScript, and the shipped pretrained tag.

Input sizes follow timm's rules (``_input_size``: the cfg's input size, each side capped at the
check's target). Checks of the small (nano, tiny; sdt_vit_fm_*) models run by default; the S/B/L
models, their full2d variants and the 224-px ViTs run under ``-m slow``, except the default-cfg
checks, which are shapes only and run for every model on the meta device.

The ViTs (``sdt.models.vit``) are isotropic: every block has the patch embedding's reduction,
features_only gives timm's ViT default (the last 3 blocks, through ``forward_intermediates``), and
their final norm is part of ``forward_features``.
"""
import contextlib
import math
from typing import Optional, Tuple

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.layers.format import get_channel_dim, get_spatial_dim
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import sdt
from sdt.attention import reference_backend
from sdt.models import SpatialDecayViT

MODELS = sorted(timm.list_models("sdt_*") + timm.list_models("rmt_*"))
MODELS_WITH_TAGS = sorted(timm.list_models("sdt_*", include_tags=True) + timm.list_models("rmt_*", include_tags=True))
PRETRAINED = sorted(timm.list_models("sdt_*", pretrained=True) + timm.list_models("rmt_*", pretrained=True))
SMALL = ("nano", "tiny")

# timm's targets (tests/test_models.py): each side of the cfg's input size is capped at these.
TARGET_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
TARGET_JIT_SIZE = 128
TARGET_FFEAT_SIZE = 96
TARGET_FWD_FX_SIZE = 128
TARGET_BWD_FX_SIZE = 128


def _heavy(name: str) -> bool:
    if name.startswith("sdt_vit_"):
        return not name.startswith("sdt_vit_fm_")  # the others are 224-px ViT-Ti/S/B
    return not any(f"_{size}" in name for size in SMALL)


def _isotropic(model: torch.nn.Module) -> bool:
    return isinstance(model, SpatialDecayViT)


def _params(names):
    """Small models by default, the others under -m slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if _heavy(n) else n for n in names]


def _input_size(cfg: dict, target: Optional[int] = None) -> Tuple[int, ...]:
    """timm's ``_get_input_size``: the cfg's size, capped at ``target`` unless the size is fixed."""
    input_size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return input_size
    if target and max(input_size) > target:
        if cfg.get("min_input_size"):
            return tuple(cfg["min_input_size"])
        input_size = tuple(min(x, target) for x in input_size)
    return input_size


def _test_sizes(cfg: dict, target: Optional[int] = None):
    """The cfg's input size and, where the cfg has one, its test size (both capped like timm)."""
    sizes = [_input_size(cfg, target)]
    if cfg.get("test_input_size"):
        sizes.append(_input_size({**cfg, "input_size": cfg["test_input_size"]}, target))
    return sizes


def test_every_family_member_is_covered():
    assert len(MODELS) == 20
    assert [n for n in MODELS if n.startswith("sdt_vit_")] == [
        "sdt_vit_base", "sdt_vit_fm_small", "sdt_vit_fm_tiny", "sdt_vit_small", "sdt_vit_tiny"]
    for name in MODELS:
        assert timm.get_pretrained_cfg(name) is not None, name
    assert PRETRAINED == ["sdt_h_nano.fmnist", "sdt_h_nano.fmnist_e30"]


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_forward(name):
    model = timm.create_model(name).eval()
    for size in _test_sizes(model.pretrained_cfg, TARGET_FWD_SIZE):
        with torch.no_grad():
            out = model(torch.randn(1, *size))
        assert out.shape == (1, model.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    size = _input_size(model.pretrained_cfg, TARGET_BWD_SIZE)
    out = model(torch.randn(2, *size))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
    assert out.shape == (2, 42) and torch.isfinite(out).all()


def _check_default_cfg(name: str) -> None:
    """timm's test_model_default_cfgs (timm 1.0.31) on the current default device.

    On the meta device (shapes only) a forward costs seconds of Python per model, so there the model
    runs once and the classifier resets are checked on ``forward_head`` of those features
    (``forward`` is ``forward_head(forward_features(x))``, checked on real tensors for the small models).
    """
    model = timm.create_model(name).eval()
    assert model.num_classes > 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    pool_size = tuple(cfg["pool_size"])
    assert model.output_fmt == "NHWC"
    spatial_axis, feat_axis = get_spatial_dim(model.output_fmt), get_channel_dim(model.output_fmt)
    x = torch.randn(1, *cfg["input_size"])
    on_meta = x.device.type == "meta"

    with torch.no_grad(), reference_backend(model) if on_meta else contextlib.nullcontext():
        features = model.forward_features(x)
        forward = (lambda m: m.forward_head(features)) if on_meta else (lambda m: m(x))  # noqa: E731
        pre_logits = model.forward_head(features, pre_logits=True)
        assert tuple(features.shape[i] for i in spatial_axis) == pool_size, "unpooled features != pool_size"
        assert features.shape[feat_axis] == model.num_features
        assert pre_logits.shape == (1, model.head_hidden_size)
        assert forward(model).shape == (1, cfg["num_classes"])

        model.reset_classifier(7)
        assert model.num_classes == 7 and forward(model).shape == (1, 7)
        assert model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert forward(model).shape == pre_logits.shape  # pooled, (1, head_hidden_size)
        model.reset_classifier(0, "")
        out = forward(model)
        assert out.ndim == 4 and tuple(out.shape[i] for i in spatial_axis) == pool_size

        headless = timm.create_model(name, num_classes=0, global_pool="").eval()
        out = forward(headless)
        assert out.ndim == 4 and tuple(out.shape[i] for i in spatial_axis) == pool_size

    for classifier in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert classifier + ".weight" in state_dict
    modules = dict(model.named_modules())
    assert cfg["first_conv"] + ".weight" in state_dict
    assert modules[cfg["first_conv"]].in_channels == cfg["input_size"][0]
    reduction = None
    for info in model.feature_info:
        assert info["module"] in modules and info["num_chs"] > 0
        # hierarchical: each stage halves the grid; isotropic: every block keeps the patch grid
        assert reduction is None or info["reduction"] == (1 if _isotropic(model) else 2) * reduction
        reduction = info["reduction"]
    assert model.feature_info[-1]["num_chs"] == model.num_features
    assert math.ceil(cfg["input_size"][1] / reduction) == pool_size[0]  # stride-2 convs round up


@pytest.mark.parametrize("name", MODELS_WITH_TAGS)
def test_model_default_cfgs(name):
    """Shapes only: the small models on the CPU, the others on the meta device (no memory, no compute)."""
    with torch.device("meta" if _heavy(name) else "cpu"):
        _check_default_cfg(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if _heavy(n)])
def test_model_default_cfgs_heavy_on_cpu(name):
    _check_default_cfg(name)


@pytest.mark.parametrize("feature_cls", [None, "getter", "hook", "fx"])
@pytest.mark.parametrize("name", _params(MODELS))
def test_model_forward_features(name, feature_cls):
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    vit = name.startswith("sdt_vit_")
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == (3 if vit else 4)  # ViT: timm's default, the last 3 blocks
    output_fmt = getattr(model, "output_fmt", "NCHW")
    # the getter (the ViTs' default) asks forward_intermediates for timm's NCHW; the others keep NHWC
    getter = feature_cls == "getter" or (feature_cls is None and vit)
    assert output_fmt == ("NCHW" if getter else "NHWC")
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    size = _input_size(model.pretrained_cfg, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(channels)
    for chs, reduction, out in zip(channels, reductions, outputs):
        assert out.shape[feat_axis] == chs and out.shape[0] == 1
        for axis, side in zip(spatial_axis, size[-2:]):
            assert out.shape[axis] == math.ceil(side / reduction)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_features_match_forward_intermediates(name):
    """Every feature class returns the same maps as forward_intermediates of the same weights (same seed)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = _input_size(model.pretrained_cfg, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        for feature_cls in (None, "getter", "hook", "fx"):
            kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
            torch.manual_seed(0)
            features = timm.create_model(name, features_only=True, **kwargs).eval()
            indices = list(features.feature_info.out_indices)
            expected = model.forward_intermediates(x, indices=indices, output_fmt="NHWC", intermediates_only=True)
            outputs = features(x)
            if getattr(features, "output_fmt", "NHWC") == "NCHW":  # the getter
                outputs = [o.permute(0, 2, 3, 1) for o in outputs]
            assert len(outputs) == len(expected)
            for got, want in zip(outputs, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(feature_cls))


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    last = len(channels) - 1
    size = _input_size(model.pretrained_cfg, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final = model.forward_features(x)
        for output_fmt in ("NCHW", "NHWC"):
            feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
            out, intermediates = model.forward_intermediates(x, output_fmt=output_fmt)
            assert torch.equal(out, final)
            assert len(intermediates) == len(channels)
            for chs, reduction, inter in zip(channels, reductions, intermediates):
                assert inter.shape[feat_axis] == chs and inter.shape[0] == 1
                for axis, side in zip(spatial_axis, size[-2:]):
                    assert inter.shape[axis] == math.ceil(side / reduction)
                assert torch.isfinite(inter).all()
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        nchw = model.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(nhwc, nchw):
            assert torch.equal(a.permute(0, 3, 1, 2), b)
        normed = model.forward_intermediates(x, norm=True, output_fmt="NHWC", intermediates_only=True)
        if _isotropic(model):  # forward_features ends with the final norm; norm=True applies it to each
            assert torch.equal(normed[-1], final)
            assert all(torch.equal(a, model.norm(b)) for a, b in zip(normed, nhwc))
        else:  # no norm before the head: the option changes nothing
            assert torch.equal(nhwc[-1], final)
            assert all(torch.equal(a, b) for a, b in zip(normed, nhwc))

        # indices: an int takes the last n stages, a list those stages (negative from the end)
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        assert [t.shape for t in last_two] == [t.shape for t in nhwc[-2:]]
        assert all(torch.equal(a, b) for a, b in zip(last_two, nhwc[-2:]))
        picked = model.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(picked[0], nhwc[0]) and torch.equal(picked[1], nhwc[last])
        # stop_early: the same maps, the later stages not run
        early = model.forward_intermediates(x, indices=[1], stop_early=True, output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(early[0], nhwc[1])
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NLC")


def _tracer_kwargs() -> dict:
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)


def _create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model``: a feature extractor returning the graph's output node(s)."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**_tracer_kwargs()).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(n)] for n in output_node_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=_tracer_kwargs())


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_forward_fx(name):
    """As timm's test: inputs made, and both models run, under torch.inference_mode; outputs equal exactly."""
    model = timm.create_model(name).eval()
    size = _input_size(model.pretrained_cfg, TARGET_FWD_FX_SIZE)
    with torch.inference_mode():
        x = torch.randn(1, *size)
        out = model(x)
        fx_model = _create_fx_model(model)
        fx_out = torch.cat(tuple(fx_model(x).values()))
    assert torch.equal(fx_out, out)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_backward_fx(name):
    model = timm.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    size = _input_size(model.pretrained_cfg, TARGET_BWD_FX_SIZE)
    fx_model = _create_fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(torch.randn(2, *size)).values()))
    out.mean().backward()
    for n, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert out.shape[-1] == 42 and torch.isfinite(out).all()


@pytest.mark.parametrize("name, kwargs", [
    ("sdt_h_nano", {}), ("rmt_nano", {}), ("sdt_h_nano_full2d", {}),
    ("sdt_vit_fm_tiny", dict(pos_embed="learned", rotary=True)), ("sdt_vit_fm_tiny", dict(pos_embed="sincos"))])
def test_plain_fx_symbolic_trace_matches_eager(name, kwargs):
    """torch.fx.symbolic_trace without timm's leaf lists: the attention's dispatch, the gate's autocast
    handling and the ViT's position embeddings are wrapped functions (torch.fx.wrap), so tracing works
    and the graph keeps any input size. The traced graph records the plain ops (separate q, k, v and
    gate GEMMs, rotary in torch), eager runs the fused projection and kernels: equal up to float rounding."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=3, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sdt.DecayGate) and m.weight is not None:
                m.weight.normal_(std=0.1)  # a gate that depends on the input
    traced = torch.fx.symbolic_trace(model.eval())
    for shape in ((2, 3, 64, 64), (1, 3, 33, 47)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6, msg=str(shape))
    traced = torch.fx.symbolic_trace(model.train())  # a graph keeps the mode it was traced in (drop path, BN)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    traced(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # traced shares the parameters
    model.zero_grad()
    torch.manual_seed(1)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", _params(MODELS))
def test_model_forward_torchscript(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    size = _input_size(model.pretrained_cfg, TARGET_JIT_SIZE)
    scripted = torch.jit.script(model)
    x = torch.randn(1, *size)
    with torch.no_grad():
        out = scripted(x)
        expected = model(x)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # the script runs the reference backend


@pytest.mark.parametrize("name", PRETRAINED)
def test_model_load_pretrained(name):
    """timm's test_model_load_pretrained and test_model_features_pretrained, on the shipped weights."""
    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=num_classes)
        assert model.num_classes == num_classes
    features = timm.create_model(name, pretrained=True, features_only=True)
    assert len(features(torch.randn(1, *features.pretrained_cfg["input_size"]))) == 4
