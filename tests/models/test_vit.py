"""sdt.models.vit: SDT attention in a plain ViT (the timm API checks are in test_timm_api.py)."""
import pytest
import timm
import torch
from timm.layers import build_sincos2d_pos_embed

import sdt  # noqa: F401  (registers the models)
from sdt.attention import SpatialDecayAttention
from sdt.models.vit import POS_EMBEDS, SpatialDecayViT, sincos_pos_embed_2d, vit_checkpoint_filter_fn

NAME = "sdt_vit_fm_tiny"


def _model(**kwargs) -> SpatialDecayViT:
    torch.manual_seed(0)
    return timm.create_model(NAME, **kwargs).eval()


def _shuffle_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Permute the (patch x patch) tiles of x: (B, C, H, W) -> same."""
    b, c, h, w = x.shape
    tiles = x.unfold(2, patch, patch).unfold(3, patch, patch).reshape(b, c, -1, patch, patch)
    tiles = tiles[:, :, perm]
    gh, gw = h // patch, w // patch
    return tiles.reshape(b, c, gh, gw, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def test_structure_plain_vit():
    model = _model(decay="cag", pos_embed="learned")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.num_classes == 10
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ["patch_embed.proj"]  # nothing spatial after the patch embedding but attention
    attns = [m for m in model.modules() if isinstance(m, SpatialDecayAttention)]
    assert len(attns) == 6
    for attn in attns:
        assert attn.layout == "full" and attn.lce is None and not attn.use_rotary
        assert attn.gate.decay == "cag"
    assert model.pos_embed.shape == (1, 14, 14, 64)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 14, 14, 64)
    assert all(m.use_rotary for m in _model(rotary=True).modules() if isinstance(m, SpatialDecayAttention))


@pytest.mark.parametrize("decay", ["none", "fixed", "learned", "cag"])
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_every_switch_trains(decay, pos_embed):
    model = _model(decay=decay, pos_embed=pos_embed).train()
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())
    assert (model.pos_embed is not None) == (pos_embed == "learned")


def test_no_position_information_is_permutation_invariant():
    """decay='none', pos_embed='none': shuffling the patches leaves the logits unchanged (the floor of the
    study has no spatial prior at all); any decay, or a position embedding, breaks that."""
    x = torch.randn(2, 1, 28, 28)
    perm = torch.randperm(196, generator=torch.Generator().manual_seed(0))
    shuffled = _shuffle_patches(x, 2, perm)

    def pooled(model, images):  # (B, C) features before the classifier: O(1) after the final norm
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def sharpened(**kwargs):  # q, k scaled up: attention far from uniform, so position matters at init
        model = _model(**kwargs)
        for m in model.modules():
            if isinstance(m, SpatialDecayAttention):
                m.q.weight.mul_(10)
                m.k.weight.mul_(10)
        return model

    with torch.no_grad():
        floor = sharpened(decay="none", pos_embed="none")
        assert (pooled(floor, shuffled) - pooled(floor, x)).abs().max() < 1e-5  # float rounding only
        for kwargs in (dict(decay="fixed"), dict(decay="cag"), dict(decay="none", pos_embed="learned"),
                       dict(decay="none", pos_embed="sincos"), dict(decay="none", rotary=True)):
            model = sharpened(**kwargs)
            assert (pooled(model, shuffled) - pooled(model, x)).abs().max() > 1e-3, kwargs


def test_cag_starts_at_fixed_decay():
    """W_g = 0, b = logit(gamma), alpha = 1: at init a cag model computes RMT's fixed decay exactly."""
    cag = _model(decay="cag")
    fixed = _model(decay="fixed")
    fixed.load_state_dict({k: v for k, v in cag.state_dict().items() if ".gate." not in k})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(cag(x), fixed(x), rtol=1e-5, atol=1e-6)
        assert (cag(x) - _model(decay="none")(x)).abs().max() > 1e-5  # the decay does act (logits ~0.1)


def test_sincos_matches_timm():
    for h, w, dim in ((14, 14, 64), (5, 7, 32)):
        torch.testing.assert_close(sincos_pos_embed_2d(h, w, dim).view(h * w, dim),
                                   build_sincos2d_pos_embed([h, w], dim), rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        timm.create_model(NAME, pos_embed="sincos", embed_dim=66, num_heads=3)


def test_other_input_sizes():
    """Any size: the input is padded to a multiple of the patch, a learned embedding is resampled."""
    model = _model(pos_embed="learned")
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 33, 40)).shape == (1, 17, 20, 64)
        assert model(torch.randn(1, 1, 56, 56)).shape == (1, 10)


def test_bad_switches_are_clear_errors():
    with pytest.raises(ValueError, match="pos_embed"):
        timm.create_model(NAME, pos_embed="rope")
    with pytest.raises(ValueError, match="cag"):  # lists the valid decays
        timm.create_model(NAME, decay="gated")


def test_checkpoint_filter_resamples_position_embedding():
    """Weights of the 28-px model load into a 56-px one (pos_embed 14x14 -> 28x28) through timm's
    pretrained path; every other tensor is unchanged."""
    source = _model(pos_embed="learned")
    state = source.state_dict()
    torch.manual_seed(1)
    target = timm.create_model(NAME, pos_embed="learned", img_size=56, pretrained=True,
                               pretrained_cfg_overlay=dict(state_dict=state))
    assert target.pos_embed.shape == (1, 28, 28, 64)
    for key, value in target.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, state[key]), key
    wrapped = vit_checkpoint_filter_fn({"model": state}, source)
    assert all(torch.equal(wrapped[k], v) for k, v in state.items())


def test_grad_checkpointing_same_result():
    x = torch.randn(2, 1, 28, 28)
    model = _model(decay="cag", pos_embed="learned", rotary=True).train()
    model(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_no_weight_decay_and_groups():
    model = _model(decay="cag", pos_embed="learned")
    names = model.no_weight_decay()
    assert "pos_embed" in names and "blocks.0.attn.gate.bias" in names and "blocks.5.attn.gate.alpha" in names
    assert not any(n.endswith("gate.weight") for n in names)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 6 + 2  # stem, 6 blocks, final norm


def test_prune_intermediate_layers():
    model = _model()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert model.prune_intermediate_layers([1, 3]) == [1, 3]
        assert len(model.blocks) == 4 and model.num_classes == 0
        got = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert model(x).shape == (1, 14, 14, 64)  # no head, no pooling


def test_features_only_out_indices():
    features = timm.create_model(NAME, features_only=True, out_indices=(0, 2, 5))
    assert features.feature_info.channels() == [64, 64, 64] and features.feature_info.reduction() == [2, 2, 2]
    outs = features(torch.randn(1, 1, 28, 28))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 14, 14)] * 3


def test_sdt_train_accepts_vit(tmp_path):
    """sdt train runs the ViT on Fashion-MNIST through the engine (decay and pos_embed as model kwargs)."""
    from sdt.engine import load_config
    from sdt.tasks import Classify, TrainConfig

    cfg = load_config(TrainConfig, "quick", [
        f"model.name={NAME}", "model.kwargs.decay=cag", "model.kwargs.pos_embed=learned",
        "data.train_subset=128", "data.val_subset=64", "data.test_subset=64", "engine.epochs=1", "engine.batch_size=32",
        "engine.threads=1", "engine.log_every_steps=2", "engine.ckpt_every_steps=100"])
    summary = Classify().train(cfg, output_dir=str(tmp_path / "run"))
    assert summary["global_step"] == 4 and 0.0 <= summary["test"]["top1"] <= 100.0
