"""Export (ONNX, TorchScript), RMT conversion and the attention-map visualisation."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sdt
from sdt.backends import spatial_decay_attention
from sdt.cli import main
from sdt.tools.export import check_onnx, convert_rmt_checkpoint, export_onnx
from sdt.models.sdt_h import SpatialDecayTransformer, rmt_config_to_kwargs
from sdt.tools.viz import attention_maps, plot_attention_maps

FIXTURES = Path(__file__).parents[1] / "fixtures" / "rmt"


@pytest.mark.parametrize("name", ["sdt_h_nano", "rmt_nano"])
def test_onnx_export_matches_pytorch_at_two_sizes(name, tmp_path):
    model = timm.create_model(name, num_classes=10, in_chans=1).eval()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    results = check_onnx(model, path, [(2, 1, 28, 28), (1, 1, 45, 33)])
    for r in results:
        assert r["max_abs_diff"] < 1e-4, r
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdt_h_tiny", "rmt_tiny", "sdt_h_small", "rmt_small"])
def test_onnx_export_larger_models(name, tmp_path):
    model = timm.create_model(name).eval()
    path = export_onnx(model, tmp_path / "m.onnx", (3, 224, 224))
    for r in check_onnx(model, path, [(1, 3, 224, 224), (1, 3, 160, 192)]):
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["max_abs_output"]), r


def _fixture(decay="fixed", **overrides):
    config = json.loads((FIXTURES / "rmt_small.json").read_text())["constructor_kwargs"]
    return SpatialDecayTransformer(**{**rmt_config_to_kwargs(config), "decay": decay, **overrides}).eval()


@pytest.mark.parametrize("decay", ["fixed", "cag"])
def test_convert_rmt_checkpoint_reproduces_logits(decay, tmp_path):
    io = load_file(FIXTURES / "rmt_small_io.safetensors")
    # RMT's training script saves {"model": state_dict, ...}: write one like it.
    torch.save({"model": load_file(FIXTURES / "rmt_small.safetensors"), "epoch": 299}, tmp_path / "rmt.pth")
    out = tmp_path / "converted.safetensors"
    counts = convert_rmt_checkpoint(str(tmp_path / "rmt.pth"), _fixture(decay), str(out))
    assert counts["gate_tensors"] == (0 if decay == "fixed" else 3 * 5)
    fresh = _fixture(decay)
    fresh.load_state_dict(load_file(out))
    with torch.no_grad():
        for size in ("64x64", "96x80"):
            assert torch.allclose(fresh(io[f"input_{size}"]), io[f"logits_{size}"], atol=1e-4)


@pytest.mark.parametrize("command", ["convert", "viz", "export"])
def test_truncated_or_foreign_weights_are_one_line_errors(command, tmp_path, capsys):
    from safetensors.torch import save_file

    ten_classes = tmp_path / "rmt10.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("rmt_nano", num_classes=10).state_dict().items()}, ten_classes)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ten_classes.read_bytes()[:1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "good.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:700])
    out = tmp_path / "out"
    for weights, message in ((truncated, "is not a readable safetensors file"), (foreign, "does not fit this model"),
                             (ten_classes, "2 shape mismatches"), (tmp_path / "truncated.pth", "not a readable PyTorch checkpoint"),
                             (tmp_path / "missing.safetensors", "does not exist")):
        args = {"convert": ["convert", str(weights), "--model", "sdt_h_nano", "--output", str(out)],
                "viz": ["viz", "--model", "sdt_h_nano", "--weights", str(weights), "--size", "32", "32", "--output", str(out)],
                "export": ["export", "sdt_h_nano", "--weights", str(weights), "--output", str(out)]}[command]
        assert main(args) == 2, weights
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (weights, err)
        assert not out.exists()


def test_script_model_matches_eager():
    model = timm.create_model("sdt_h_nano", num_classes=10).eval()
    scripted = sdt.tools.export.script_model(model)
    x = torch.randn(1, 3, 30, 26)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def _perturbed_sdt():
    torch.manual_seed(0)
    model = timm.create_model("sdt_h_nano", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sdt.DecayGate):
                m.weight.normal_(std=0.5)
    return model


def test_attention_maps_shapes_and_normalisation():
    model = _perturbed_sdt()
    image = torch.randn(1, 1, 28, 28)
    maps = attention_maps(model, image, (10, 20))
    grids = [(14, 14), (7, 7), (4, 4), (2, 2)]
    for stage_maps, grid, heads in zip(maps, grids, (2, 4, 8, 16)):
        for key in ("gate", "decay", "decay_fixed", "attn", "attn_plain"):
            assert stage_maps[key].shape == (heads, *grid), key
        for key in ("attn", "attn_plain"):
            assert torch.allclose(stage_maps[key].sum((1, 2)), torch.ones(heads), atol=1e-5)
        assert (stage_maps["decay"] <= 1).all() and (stage_maps["decay"] > 0).all()
        assert not torch.allclose(stage_maps["decay"], stage_maps["decay_fixed"])  # the gate changed it
    assert maps[0]["query"] == (10, 5)


@pytest.mark.parametrize("stage_index", [0, 2])  # decomposed and full layouts
def test_attention_maps_reproduce_the_layer_output(stage_index):
    """The map's weights times v equal the attention output the layer itself computes for that query."""
    model = _perturbed_sdt()
    image = torch.randn(1, 1, 28, 28)
    maps = attention_maps(model, image, (13, 6))[stage_index]
    attn = model.stages[stage_index].blocks[-1].attn
    captured = []
    hook = attn.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(image)
    hook.remove()
    x = captured[0]
    height, width = x.shape[1:3]
    sin, cos = sdt.rotary_tables((height, width), attn.head_dim)
    with torch.no_grad():
        q = sdt.apply_rotary(attn._heads(attn.q(x)), sin, cos)
        k = sdt.apply_rotary(attn._heads(attn.k(x)), sin, cos)
        v = attn._heads(attn.v(x))
        out = spatial_decay_attention(q, k, v, attn.gate(x), (height, width), attn.layout, attn.distance, "reference")
    r, c = maps["query"]
    expected = out[0, :, r * width + c]  # (n, d)
    got = torch.einsum("nl,nld->nd", maps["attn"].flatten(1), v[0])
    assert torch.allclose(got, expected, atol=1e-5)


def test_untrained_sdt_decay_equals_rmt_and_plots(tmp_path):
    model = timm.create_model("sdt_h_nano", num_classes=10).eval()
    maps = attention_maps(model, torch.randn(1, 3, 32, 32), (5, 5))
    for stage_maps in maps:
        assert torch.allclose(stage_maps["decay"], stage_maps["decay_fixed"], atol=1e-5)
    paths = plot_attention_maps(maps, torch.rand(32, 32, 3), (5, 5), str(tmp_path))
    assert len(paths) == 4 and all(p.stat().st_size > 10_000 for p in paths)


def _perturbed_vit(**kwargs):
    model = timm.create_model("sdt_vit_fm_tiny", depth=2, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sdt.DecayGate):
                m.weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize("rotary", [False, True])
def test_vit_attention_maps_reproduce_the_layer_output(rotary):
    """sdt_vit_* has one stack of blocks and no rotary by default: the maps of every block (block=None)
    still give the attention output the layer computes, with and without rotary."""
    model = _perturbed_vit(rotary=rotary, pos_embed="learned")
    image = torch.randn(1, 1, 28, 28)
    maps = attention_maps(model, image, (13, 6), block=None)
    assert [m["label"] for m in maps] == ["block 1", "block 2"]
    attn = model.blocks[1].attn
    captured = []
    hook = attn.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(image)
    hook.remove()
    x = captured[0]
    height, width = x.shape[1:3]
    with torch.no_grad():
        q, k, v = attn._heads(attn.q(x)), attn._heads(attn.k(x)), attn._heads(attn.v(x))
        if rotary:
            sin, cos = sdt.rotary_tables((height, width), attn.head_dim)
            q, k = sdt.apply_rotary(q, sin, cos), sdt.apply_rotary(k, sin, cos)
        out = spatial_decay_attention(q, k, v, attn.gate(x), (height, width), attn.layout, attn.distance, "reference")
    r, c = maps[1]["query"]
    assert (r, c) == (3, 6)
    got = torch.einsum("nl,nld->nd", maps[1]["attn"].flatten(1), v[0])
    assert torch.allclose(got, out[0, :, r * width + c], atol=1e-5)
    assert not torch.allclose(maps[1]["decay"], maps[1]["decay_fixed"])


def test_attention_maps_reject_other_models_and_missing_blocks():
    with pytest.raises(ValueError, match="sdt_vit_"):
        attention_maps(timm.create_model("resnet18"), torch.randn(1, 3, 32, 32), (5, 5))
    with pytest.raises(ValueError, match="block 7 does not exist: the block has 2 blocks"):
        attention_maps(_perturbed_vit(), torch.randn(1, 1, 28, 28), (5, 5), block=7)
    with pytest.raises(ValueError, match="block -5 does not exist: the stage has"):
        attention_maps(_perturbed_sdt(), torch.randn(1, 1, 28, 28), (5, 5), block=-5)


def test_query_outside_image_is_rejected():
    model = timm.create_model("rmt_nano").eval()
    with pytest.raises(ValueError, match="outside"):
        attention_maps(model, torch.randn(1, 3, 32, 32), (40, 3))


@pytest.mark.slow
def test_torch_compile_same_outputs():
    model = timm.create_model("sdt_h_nano", num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-4)


def test_cli_models_export_convert_viz(tmp_path, capsys):
    from safetensors.torch import save_file

    from sdt.cli import main

    assert main(["models", "rmt_nano", "--input-size", "1", "28", "28"]) == 0
    assert "| `rmt_nano` | 3,5" in capsys.readouterr().out
    assert main(["export", "rmt_nano", "--in-chans", "1", "--num-classes", "10", "--input-size", "28", "28",
                 "--output", str(tmp_path / "m.onnx")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    rmt = timm.create_model("rmt_nano")
    save_file({k: v.contiguous() for k, v in rmt.state_dict().items()}, tmp_path / "w.safetensors")
    assert main(["convert", str(tmp_path / "w.safetensors"), "--model", "sdt_h_nano", "--output", str(tmp_path / "s.safetensors")]) == 0
    assert main(["viz", "--model", "sdt_h_nano", "--weights", str(tmp_path / "s.safetensors"), "--image", "coffee",
                 "--size", "32", "40", "--query", "10,12", "--output", str(tmp_path / "viz")]) == 0
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == [f"stage{i}.png" for i in range(1, 5)]
    assert main(["viz", "--model", "sdt_h_nano", "--in-chans", "1", "--num-classes", "10", "--image", "fmnist:3",
                 "--size", "28", "28", "--output", str(tmp_path / "viz_fmnist")]) == 0
    assert len(list((tmp_path / "viz_fmnist").glob("stage*.png"))) == 4
    assert main(["viz", "--model", "sdt_vit_fm_tiny", "--in-chans", "1", "--num-classes", "10", "--image", "fmnist:3",
                 "--block", "all", "--output", str(tmp_path / "viz_vit")]) == 0
    assert sorted(p.name for p in (tmp_path / "viz_vit").iterdir()) == [f"block{i}.png" for i in range(1, 7)]
    assert main(["viz", "--model", "sdt_h_nano", "--image", "missing.png"]) == 2
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert main(["viz", "--model", "sdt_h_nano", "--image", str(tmp_path / "broken.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["export", "rmt_nano", "--format", "torchscript", "--output", str(tmp_path / "m.pt")]) == 0
    assert torch.jit.load(str(tmp_path / "m.pt"))(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_create_model_from_weights_reads_torch_checkpoints_safely(tmp_path):
    import argparse

    from sdt.tools.export import create_model_from_weights

    rmt = timm.create_model("rmt_nano", num_classes=10).eval()
    torch.save({"model": rmt.state_dict(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ckpt.pth")
    model = create_model_from_weights("sdt_h_nano", str(tmp_path / "ckpt.pth"), num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), rmt(x), atol=1e-5)  # SDT from RMT weights starts as RMT

    import datetime  # any object beyond tensors, containers and Namespace is refused, not unpickled

    torch.save({"model": rmt.state_dict(), "when": datetime.datetime(2026, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        create_model_from_weights("rmt_nano", str(tmp_path / "bad.pth"), num_classes=10)
    with pytest.raises(ValueError, match="--num-classes"):
        create_model_from_weights("rmt_nano", str(tmp_path / "ckpt.pth"), num_classes=5)
