"""sdt.attention.GateDrift: how far the learned decay rates have moved from RMT's fixed rates."""
import pytest
import timm
import torch

import sdt  # noqa: F401  (registers the models)
from sdt.attention import DecayGate, GateDrift, SpatialDecayAttention


def test_drift_is_zero_at_initialisation_and_the_mean_distance_after_training():
    torch.manual_seed(0)
    model = timm.create_model("sdt_vit_fm_tiny", decay="cag").eval()
    x = torch.randn(3, 1, 28, 28)
    with GateDrift(model) as drift, torch.no_grad():
        model(x)
    start = drift.metrics()
    assert set(start) == {"gate_drift"} | {f"gate_drift.{i}" for i in range(6)}
    assert all(v < 1e-6 for v in start.values())  # W_g = 0, b = logit(gamma): exactly RMT's rates

    gate = model.blocks[2].attn.gate
    with torch.no_grad():
        gate.weight.normal_(0, 0.2)
        gate.alpha.fill_(1.5)
    inputs = []
    hook = model.blocks[2].attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with GateDrift(model) as drift, torch.no_grad():
        model(x)
        model(x[:1])  # a second pass of another batch size is averaged per token
    hook.remove()
    moved = drift.metrics()
    with torch.no_grad():
        expected = torch.cat([(gate.gate_map(x) * 1.5 - gate.fixed_rates.view(1, -1, 1)).abs().flatten() for x in inputs]).mean()
    assert moved["gate_drift.2"] == pytest.approx(float(expected), rel=1e-5)
    assert moved["gate_drift.2"] > 0.01 and moved["gate_drift.1"] < 1e-6
    assert moved["gate_drift"] == pytest.approx(sum(moved[f"gate_drift.{i}"] for i in range(6)) / 6)
    assert not gate._forward_hooks  # the hooks go with the with-block


@pytest.mark.parametrize("decay, gates", [("fixed", 0), ("none", 0), ("learned", 6)])
def test_only_learnable_gates_are_tracked(decay, gates):
    model = timm.create_model("sdt_vit_fm_tiny", decay=decay).eval()
    drift = GateDrift(model)
    assert len(drift.gates) == gates and all(isinstance(g, DecayGate) for g in drift.gates)
    with drift, torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert bool(drift.metrics()) == bool(gates)


def test_a_gate_that_saw_no_forward_pass_gives_no_metrics():
    assert GateDrift(timm.create_model("sdt_vit_fm_tiny", decay="cag")).metrics() == {}


def test_gate_input_replaces_the_tokens_the_gate_reads():
    """``gate_input`` equal to x gives the fused path's result (the gate's logits then come from their own
    GEMM); other tokens change only the rates."""
    torch.manual_seed(0)
    attn = SpatialDecayAttention(16, 2, decay="cag")
    with torch.no_grad():
        attn.gate.weight.normal_(0, 0.5)
    x = torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(attn(x, gate_input=x), attn(x), atol=1e-5, rtol=1e-5)
    other = torch.randn(2, 3, 4, 16)
    assert not torch.allclose(attn(x, gate_input=other), attn(x), atol=1e-4)
