"""The decay math (sdt.decay) and the gate (DecayGate) against their definitions."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdt.attention import DECAYS, DecayGate, SpatialDecayAttention, apply_rotary, rotary_tables
from sdt.backends import spatial_decay_attention
from sdt.decay import (
    DECAY_VARIANTS, DISTANCES, DecayVariantError, decay_rates, decay_variant, decomposed_biases, full_2d_bias,
    grid_distance, line_distance, rate_logits)


def test_decay_rates_match_rmt_formula():
    rates = decay_rates(4, init_value=2, heads_range=4)
    expected = [math.log(1 - 2 ** -(2 + 4 * h / 4)) for h in range(4)]
    assert torch.allclose(rates, torch.tensor(expected), atol=0, rtol=1e-6)
    assert (rates < 0).all() and rates[0] < rates[-1]  # head 0 decays fastest


def test_rate_logits_inverts_logsigmoid():
    rates = decay_rates(8, 2, 6)
    assert torch.allclose(F.logsigmoid(rate_logits(rates)), rates, atol=1e-7, rtol=1e-6)


def test_full_2d_bias_matches_naive_loop():
    height, width, heads = 3, 4, 2
    rates = -torch.rand(2, heads, height * width)
    bias = full_2d_bias(rates, height, width)
    for b in range(2):
        for h in range(heads):
            for i in range(height * width):
                for j in range(height * width):
                    dist = abs(i // width - j // width) + abs(i % width - j % width)
                    expected = -abs(0.5 * (rates[b, h, i] + rates[b, h, j]).item() * dist)
                    assert bias[b, h, i, j].item() == pytest.approx(expected, abs=1e-6)


def test_fixed_bias_is_bitwise_rmt_mask():
    """RMT: mask = decay[h] * |grid_i - grid_j|_1, computed in float32."""
    rates = decay_rates(4, 2, 4)
    bias = full_2d_bias(rates.view(1, -1, 1), 5, 6)[0]
    rmt_mask = grid_distance(5, 6) * rates[:, None, None]
    assert torch.equal(bias, rmt_mask)
    row_bias, col_bias = decomposed_biases(rates.view(1, -1, 1), 5, 6)
    assert torch.equal(row_bias[0, 0], line_distance(6) * rates[:, None, None])
    assert torch.equal(col_bias[0, 0], line_distance(5) * rates[:, None, None])


@pytest.mark.parametrize("kind", ["manhattan", "indicator"])
def test_bias_symmetric_attenuating_zero_diagonal(kind):
    rates = torch.randn(2, 3, 20) * 3  # any sign: the abs keeps the bias attenuating
    bias = full_2d_bias(rates, 4, 5, kind)
    assert torch.equal(bias, bias.transpose(-1, -2))
    assert (bias <= 0).all()
    assert (torch.diagonal(bias, dim1=-2, dim2=-1) == 0).all()
    row_bias, col_bias = decomposed_biases(rates, 4, 5, kind)
    for b in (row_bias, col_bias):
        assert torch.equal(b, b.transpose(-1, -2)) and (b <= 0).all()
        assert (torch.diagonal(b, dim1=-2, dim2=-1) == 0).all()


def test_indicator_distance_has_no_spatial_prior():
    dist = grid_distance(3, 3, "indicator")
    assert torch.equal(dist, 1 - torch.eye(9))


def test_decomposed_attention_matches_definition():
    """Rows then columns, each with its own 1D decay, written out with explicit loops."""
    torch.manual_seed(0)
    batch, heads, height, width, dim = 2, 2, 3, 4, 8
    q, k, v = (torch.randn(batch, heads, height * width, dim) for _ in range(3))
    rates = -torch.rand(batch, heads, height * width)
    out = spatial_decay_attention(q, k, v, rates, (height, width), "decomposed", "manhattan", "reference")

    def attend(qs, ks, vs, s):
        m = len(s)
        logits = qs @ ks.T / math.sqrt(dim)
        bias = torch.tensor([[-abs(0.5 * (s[i] + s[j]) * abs(i - j)) for j in range(m)] for i in range(m)])
        return torch.softmax(logits + bias, -1) @ vs

    grid = lambda t: t.reshape(batch, heads, height, width, -1)  # noqa: E731
    q5, k5, v5, s4 = grid(q), grid(k), grid(v), rates.reshape(batch, heads, height, width).tolist()
    expected = torch.empty_like(v5)
    for b in range(batch):
        for h in range(heads):
            after_rows = torch.stack([attend(q5[b, h, r], k5[b, h, r], v5[b, h, r], s4[b][h][r]) for r in range(height)])
            for c in range(width):
                column_rates = [s4[b][h][r][c] for r in range(height)]
                expected[b, h, :, c] = attend(q5[b, h, :, c], k5[b, h, :, c], after_rows[:, c], column_rates)
    assert torch.allclose(out, expected.reshape(batch, heads, height * width, dim), atol=1e-5)


def test_full_attention_matches_naive_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    rates = -torch.rand(1, 2, 6)
    out = spatial_decay_attention(q, k, v, rates, (2, 3), "full", "manhattan", "reference")
    logits = q @ k.transpose(-1, -2) / 2.0 + full_2d_bias(rates, 2, 3)
    assert torch.allclose(out, torch.softmax(logits, -1) @ v, atol=1e-6)


@pytest.mark.parametrize("decay", [d for d in DECAYS if d != "none"])
def test_gate_starts_at_rmt_decay(decay):
    gate = DecayGate(16, 4, decay, init_value=2, heads_range=4)
    rates = gate(torch.randn(2, 3, 5, 16))
    expected = decay_rates(4, 2, 4).view(1, 4, 1).expand_as(rates)
    assert rates.dtype == torch.float32
    assert torch.allclose(rates, expected, atol=1e-6)


def test_decay_variant_table():
    assert list(DECAY_VARIANTS) == ["none", "fixed", "learned", "cag", "content"]
    assert all(v.distance in DISTANCES + (None,) for v in DECAY_VARIANTS.values())
    assert [n for n, v in DECAY_VARIANTS.items() if not v.has_bias] == ["none"]
    assert [n for n, v in DECAY_VARIANTS.items() if v.token_dependent] == ["cag", "content"]
    assert [n for n, v in DECAY_VARIANTS.items() if v.distance == "indicator"] == ["content"]
    assert decay_variant("cag") is DECAY_VARIANTS["cag"]


def test_decay_variant_alias_and_unknown_name():
    assert decay_variant("vanilla") is DECAY_VARIANTS["none"]  # DiT's old name, still in saved configs
    with pytest.raises(DecayVariantError, match=r"unknown decay 'cga'; choose one of \('none', 'fixed'"):
        decay_variant("cga")
    with pytest.raises(ValueError, match="unknown decay None"):
        decay_variant(None)


@pytest.mark.parametrize("name", list(DECAY_VARIANTS))
def test_gate_and_attention_follow_the_table(name):
    variant = DECAY_VARIANTS[name]
    gate = DecayGate(16, 4, name)
    rates = gate(torch.randn(2, 3, 5, 16))
    assert (rates is not None) == variant.has_bias
    if rates is not None:
        assert rates.shape == ((2, 4, 15) if variant.token_dependent else (1, 4, 1))
    assert any(True for _ in gate.parameters()) == variant.learnable
    assert SpatialDecayAttention(16, 4, decay=name).distance == (variant.distance or "manhattan")


def test_gate_output_shapes():
    x = torch.randn(2, 3, 5, 16)
    assert DecayGate(16, 4, "none")(x) is None
    assert DecayGate(16, 4, "fixed")(x).shape == (1, 4, 1)
    assert DecayGate(16, 4, "learned")(x).shape == (1, 4, 1)
    assert DecayGate(16, 4, "cag")(x).shape == (2, 4, 15)
    assert DecayGate(16, 4, "content")(x).shape == (2, 4, 15)


def test_gate_parameters_per_variant():
    def names(decay, alpha="learned"):
        return sorted(n for n, _ in DecayGate(16, 4, decay, alpha=alpha).named_parameters())
    assert names("none") == [] and names("fixed") == []
    assert names("learned") == ["alpha", "bias"]
    assert names("cag") == ["alpha", "bias", "weight"]
    assert names("cag", alpha="fixed") == ["bias", "weight"]


def test_huge_gate_logits_stay_finite():
    gate = DecayGate(8, 2, "cag")
    with torch.no_grad():
        gate.weight.fill_(1e30)
    x = torch.randn(1, 4, 4, 8) * 1e8
    rates = gate(x)
    assert torch.isfinite(rates).all()
    bias = full_2d_bias(rates, 4, 4)
    assert torch.isfinite(bias).all()
    q = k = v = torch.randn(1, 2, 16, 4)
    out = spatial_decay_attention(q, k, v, rates, (4, 4), "full", "manhattan", "reference")
    assert torch.isfinite(out).all()


def test_gate_is_float32_under_bf16_autocast():
    gate = DecayGate(16, 4, "cag")
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(2, 4, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rates = gate(x)
    assert rates.dtype == torch.float32
    assert torch.allclose(rates, gate(x), atol=1e-6)  # not rounded to bf16
    assert full_2d_bias(rates, 4, 4).dtype == torch.float32


def test_gradients_reach_gate_weight_and_alpha():
    gate = DecayGate(16, 4, "cag")
    x = torch.randn(2, 3, 3, 16)
    q, k, v = (torch.randn(2, 4, 9, 4) for _ in range(3))
    out = spatial_decay_attention(q, k, v, gate(x), (3, 3), "full", "manhattan", "reference")
    out.square().sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _aten_output_dtypes(fn):
    """The dtypes of every tensor that the aten ops of fn() produce."""
    from conftest import RecordOps

    with RecordOps() as record:
        result = fn()
    return result, {t.dtype for t in torch.utils._pytree.tree_leaves(record.outputs) if isinstance(t, torch.Tensor)}


def test_rotary_stays_in_bf16_under_autocast():
    """float32 tables used to promote bf16 q/k to float32 for the whole product; now they are cast to x's dtype."""
    sin, cos = rotary_tables((3, 4), 8)
    x = torch.randn(2, 2, 12, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dtypes = _aten_output_dtypes(lambda: apply_rotary(x, sin, cos))
    assert out.dtype == torch.bfloat16 and dtypes == {torch.bfloat16}
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    torch.testing.assert_close(out, x * cos.bfloat16() + rotated * sin.bfloat16(), atol=0, rtol=0)


def test_rotary_float32_unchanged():
    sin, cos = rotary_tables((3, 4), 8)
    x = torch.randn(2, 2, 12, 8)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = apply_rotary(x, sin, cos)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x * cos + rotated * sin, atol=0, rtol=0)  # bit for bit the old formula


def test_attention_docstring_table_matches_the_variant_table():
    """sdt.attention's table for the reader says what DECAY_VARIANTS says."""
    import sdt.attention

    rows = [line.split("|")[1:-1] for line in sdt.attention.__doc__.splitlines() if line.startswith('| "')]
    assert [name.strip().strip('"') for name, *_ in rows] == list(DECAY_VARIANTS)
    dist_words = {None: "-", "manhattan": "Manhattan", "indicator": "[i != j]"}
    for name, _, dist, params in rows:
        variant = DECAY_VARIANTS[name.strip().strip('"')]
        assert dist.strip() == dist_words[variant.distance], name
        assert ("W_g" in params) == variant.token_dependent, name
        assert ("alpha" in params) == variant.learnable, name
