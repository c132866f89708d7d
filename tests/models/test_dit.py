"""DiT with spatial-decay attention: shapes, DiT's initialisation, guidance, configs, errors."""
import pytest
import torch
import torch.nn.functional as F

from sdt.attention import SpatialDecayAttention
from sdt.decay import DECAY_VARIANTS
from sdt.models.dit import DiT, create_dit, list_dits


def tiny(**kwargs) -> DiT:
    args = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, learn_sigma=False)
    args.update(kwargs)
    return DiT(**args)


def _randomize(model: DiT) -> DiT:
    """Break the zero init so outputs depend on every input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn", list(DECAY_VARIANTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_any_divisible_grid(attn, channels):
    model = _randomize(tiny(decay=attn, in_channels=channels, learn_sigma=True))
    for size in ((16, 16), (8, 24)):
        x = torch.randn(2, channels, *size)
        out = model(x, torch.tensor([3, 700]), torch.tensor([1, 9]))
        assert out.shape == (2, 2 * channels, *size) and torch.isfinite(out).all()


def test_attn_kinds_select_the_decay():
    for attn in DECAY_VARIANTS:
        model = tiny(decay=attn)
        assert model.decay == attn and model.blocks[0].attn.gate.decay == attn
    assert tiny(decay="none").blocks[0].attn.gate(torch.zeros(1, 4, 4, 32)) is None
    with pytest.raises(ValueError, match="choose one of"):
        tiny(decay="rmt")


def test_old_vanilla_name_reads_as_none():
    """Configs saved before DiT spelt "none" like the backbones say attn="vanilla": same model, same weights."""
    old, new = tiny(decay="vanilla"), tiny(decay="none")
    assert old.decay == "none" and old.blocks[0].attn.gate.decay == "none"
    assert old.state_dict().keys() == new.state_dict().keys()
    new.load_state_dict(_randomize(old).state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([2, 3])
    torch.testing.assert_close(old.eval()(x, t, y), new.eval()(x, t, y), atol=0, rtol=0)


def test_zero_init_gives_zero_output_and_gate_starts_at_rmt():
    """adaLN-Zero: the final layer is zero, so the untrained model predicts 0; CAG's gate starts at RMT's rates."""
    model = tiny(decay="cag")
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        gate = block.attn.gate
        torch.testing.assert_close(gate(torch.randn(1, 4, 4, 32)), gate.fixed_rates.view(1, -1, 1).expand(1, -1, 16))


def test_no_decay_attention_is_plain_multihead_attention():
    """attn="none": no decay, no rotary, no LCE -> exactly softmax(q k^T / sqrt(d)) v with output projection."""
    torch.manual_seed(0)
    attn = SpatialDecayAttention(32, 4, decay="none", lce_kernel_size=0, rotary=False)
    x = torch.randn(2, 3, 5, 32)
    heads = lambda t: t.flatten(1, 2).unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x)))
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 3, 5, 32))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    assert attn.lce is None


def test_decay_changes_the_output():
    base = _randomize(tiny(decay="none"))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([2, 3])
    outs = {}
    for attn in DECAY_VARIANTS:
        model = tiny(decay=attn).eval()  # eval: no label dropout
        model.load_state_dict(base.state_dict(), strict=False)  # cag's gate params keep their init
        outs[attn] = model(x, t, y)
    assert not torch.allclose(outs["none"], outs["fixed"], atol=1e-4)
    assert not torch.allclose(outs["fixed"], outs["content"], atol=1e-4)  # another distance
    for attn in ("learned", "cag"):  # both start exactly at RMT's decay
        torch.testing.assert_close(outs["fixed"], outs[attn])


def test_label_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    y = torch.arange(4)
    torch.testing.assert_close(model.y_embedder(y, train=True), model.y_embedder.embedding_table(torch.full_like(y, 10)))
    torch.testing.assert_close(model.y_embedder(y, train=False), model.y_embedder.embedding_table(y))


@pytest.mark.parametrize("channels", [1, 3])
def test_guidance_uses_every_image_channel(channels):
    """DiT's forward_with_cfg guided only 3 of 4 channels; ours guides all C eps channels, sigma comes from cond."""
    model = _randomize(tiny(in_channels=channels, learn_sigma=True)).eval()
    x, t, y = torch.randn(2, channels, 16, 16), torch.tensor([5, 500]), torch.tensor([4, 7])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    out = model.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(out[:, :channels], uncond[:, :channels] + 3.0 * (cond - uncond)[:, :channels], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, channels:], cond[:, channels:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        tiny(class_dropout_prob=0.0).forward_with_cfg(x[:, :1], t, y, 2.0)


def test_registry_has_dit_names_and_sizes():
    names = list_dits()
    for size in ("s", "b", "l", "xl"):
        for patch in (2, 4, 8):
            assert f"dit_{size}_{patch}" in names
    model = create_dit("DiT-S/2", depth=1)  # DiT's spelling works too; kwargs override
    assert (model.hidden_size, len(model.blocks), model.patch_size, model.in_channels, model.out_channels) == (384, 1, 2, 4, 8)
    small = create_dit("dit_n_4", decay="fixed")
    assert (small.in_channels, small.out_channels, small.num_classes) == (1, 1, 10)
    with pytest.raises(ValueError, match="unknown DiT config"):
        create_dit("dit_s_3")


def test_bad_inputs_name_the_problem():
    model = tiny()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 1, 18, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiT(input_size=30, patch_size=4)


def test_trains_one_step():
    model = tiny(decay="cag")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    loss = (model(x, t, y) - x).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert torch.count_nonzero(model.final_layer.linear.weight) > 0


@pytest.mark.parametrize("attn", list(DECAY_VARIANTS))
def test_grad_checkpointing_same_output_and_grads(attn):
    """set_grad_checkpointing (what engine.grad_checkpointing=true calls) recomputes each block in backward:
    the same loss and gradients, label dropout included (the RNG is drawn outside the blocks)."""
    model = _randomize(tiny(decay=attn, learn_sigma=True)).train()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([3, 400, 999]), torch.tensor([0, 5, 9])

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x, t, y)
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = loss_and_grads()
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    out_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".attn." in n)
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def _gate_rates(model: DiT, t: torch.Tensor) -> list:
    """The rates every block's decay gate hands to the attention, for one image, label 1 and timesteps t."""
    rates = []
    hooks = [block.attn.gate.register_forward_hook(lambda m, inp, out: rates.append(out.detach()))
             for block in model.blocks]
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(len(t), -1, -1, -1),
              t, torch.ones(len(t), dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return rates


def test_gate_input_normalized_keeps_the_timestep_out_of_the_gate():
    """With gate_input="normalized" the gate reads LayerNorm(x), so at the first block (whose x does not depend
    on t) its rates are the same at every timestep; adaLN's modulation makes them differ in the default."""
    t = torch.tensor([0.1, 0.9])
    for gate_input, same in (("normalized", True), ("modulated", False)):
        model = _randomize(tiny(decay="cag", gate_input=gate_input)).eval()
        first = _gate_rates(model, t)[0]  # (2, n, L): one row per timestep
        assert torch.allclose(first[0], first[1]) is same, gate_input


def test_gate_input_normalized_is_the_gate_on_the_block_norm():
    model = _randomize(tiny(decay="cag", gate_input="normalized")).eval()
    block = model.blocks[0]
    x = torch.randn(2, 4, 4, 32)
    c = torch.randn(2, 32)
    seen = []
    hook = block.attn.gate.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        block(x, c)
    hook.remove()
    torch.testing.assert_close(seen[0], block.norm1(x))
    with pytest.raises(ValueError, match="unknown gate_input 'adaln'.*normalized"):
        tiny(decay="cag", gate_input="adaln")
