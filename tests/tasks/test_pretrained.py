"""Fine-tuning from weights (sdt train --initial-checkpoint): our safetensors, a shipped tag, and RMT's
released .pth format through the converter, into a model with another head or other input channels."""
import argparse
import json
import re

import pytest
import timm
import torch
from timm.models import adapt_input_conv

import sdt  # noqa: F401  (registers the models)
from sdt.errors import CheckpointError, ConfigError
from sdt.files import load_weights, save_weights
from sdt.tasks.pretrained import load_initial_checkpoint, weights_file

TINY = dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], projection_dim=16)
TAG = "sdt_h_nano.fmnist_e30"


def _to_rmt_key(key: str) -> str:
    """Our key -> the name RMT's released VisRetNet gives it (the inverse of models.sdt_h._rmt_key)."""
    match = re.match(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.*)", key)
    if match:  # we downsample at the start of stage s + 1, RMT at the end of stage s
        part = "reduction" if match.group(2) == "conv" else "norm"
        return f"layers.{int(match.group(1)) - 1}.downsample.{part}.{match.group(3)}"
    for new, old in (("head.fc.", "head."), ("head.proj.", "proj."), ("head.norm.", "norm.")):
        if key.startswith(new):
            return old + key[len(new):]
    key = key.replace("stem.conv.", "patch_embed.proj.")
    key = re.sub(r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks.", key)
    for ours, rmt in ((".attn.q.", ".retention.q_proj."), (".attn.k.", ".retention.k_proj."),
                      (".attn.v.", ".retention.v_proj."), (".attn.proj.", ".retention.out_proj."),
                      (".attn.lce.", ".retention.lepe.conv."), (".cpe.", ".pos.conv."),
                      (".mlp.dwconv.", ".ffn.dwconv.conv."), (".mlp.", ".ffn."),
                      (".norm1.", ".retention_layer_norm."), (".norm2.", ".final_layer_norm."),
                      (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2")):
        key = key.replace(ours, rmt)
    return key


def _rmt_release_file(path, model):
    """A checkpoint in the format of RMT's released ImageNet files: {"model": RMT-named tensors, "args": Namespace}."""
    state = {_to_rmt_key(k): v.clone() for k, v in model.state_dict().items() if ".attn.gate." not in k}
    assert len(state) == len([k for k in model.state_dict() if ".attn.gate." not in k])  # the renaming is one-to-one
    torch.save({"model": state, "args": argparse.Namespace(model="RMT_T", lr=1e-3), "epoch": 299}, path)
    return path


def test_rmt_release_checkpoint_into_sdt_with_another_head_and_grey_stem(tmp_path):
    torch.manual_seed(0)
    rmt = timm.create_model("rmt_nano", num_classes=7, **TINY)
    path = _rmt_release_file(tmp_path / "rmt_release.pth", rmt)
    model = timm.create_model("sdt_h_nano", num_classes=4, in_chans=1, **TINY)
    fresh_head = model.head.fc.weight.detach().clone()
    note = load_initial_checkpoint(model, str(path))
    assert "reset the head head.fc (7 classes in the file, 4 in the model)" in note
    assert "adapted the stem stem.conv.0 from 3 to 1 input channels" in note
    source, loaded = rmt.state_dict(), model.state_dict()
    torch.testing.assert_close(loaded["stem.conv.0.weight"], adapt_input_conv(1, source["stem.conv.0.weight"]))
    torch.testing.assert_close(loaded["head.fc.weight"], fresh_head)
    same = [k for k in source if k not in ("stem.conv.0.weight", "head.fc.weight", "head.fc.bias")]
    assert len(same) > 50
    for key in same:
        torch.testing.assert_close(loaded[key], source[key], msg=key)


def test_our_weights_load_whole_when_head_and_channels_fit(tmp_path):
    model = timm.create_model("sdt_h_nano", num_classes=10, in_chans=1)
    note = load_initial_checkpoint(model, TAG)
    assert note.endswith("every tensor loaded as it is")
    shipped = load_weights(weights_file(TAG))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, shipped[key].to(value.dtype), msg=key)  # shipped as float16
    rgb = timm.create_model("sdt_h_nano", num_classes=10, in_chans=3)
    assert "from 1 to 3 input channels" in load_initial_checkpoint(rgb, str(weights_file(TAG)))


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_weights(path, timm.create_model("sdt_h_nano", **TINY).state_dict())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_initial_checkpoint(timm.create_model("sdt_h_nano"), str(path))
    with pytest.raises(CheckpointError, match="neither a weights file"):
        load_initial_checkpoint(timm.create_model("sdt_h_nano"), str(tmp_path / "missing.safetensors"))


def test_sdt_train_initial_checkpoint_starts_from_the_weights(fake_fmnist, tmp_path, capsys):
    from conftest import tiny_overrides
    from sdt.cli import main

    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(fake_fmnist, **{"engine.epochs": "1", "engine.lr": "1e-12",
                                                           "engine.warmup_lr": "1e-12", "engine.min_lr": "1e-12",
                                                           "data.input_size": "28"})
                 if not o.startswith("model.")]  # the shipped weights' own architecture, sdt_h_nano
    args = ["train", "--recipe", "quick", "--output", str(out), "--initial-checkpoint", TAG]
    assert main(args + [a for o in overrides for a in ("-o", o)]) == 0
    err = capsys.readouterr().err
    assert f"sdt: initial weights from {TAG}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_weights"].endswith("every tensor loaded as it is")
    assert "initial weights" in (out / "report.md").read_text()
    assert f"initial_checkpoint: {TAG}" in (out / "config.yaml").read_text()
    # with a learning rate of 1e-12 the trained weights are the shipped ones (to float32 rounding)
    trained, shipped = load_weights(out / "best.safetensors"), load_weights(weights_file(TAG))
    for key in ("stem.conv.0.weight", "head.fc.weight", "stages.2.blocks.0.attn.q.weight"):
        torch.testing.assert_close(trained[key], shipped[key].float(), rtol=1e-5, atol=1e-6, msg=key)


def test_a_fine_tune_resumes_without_its_initial_weights_file(fake_fmnist, tmp_path, capsys):
    """The checkpoint holds the weights, so resuming reads no initial file: it may be gone by then."""
    import shutil

    from conftest import tiny_overrides
    from sdt.cli import main
    from sdt.engine.checkpoints import checkpoint_dirs

    initial = tmp_path / "initial.safetensors"
    shutil.copy(weights_file(TAG), initial)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(fake_fmnist, **{"data.input_size": "28"}) if not o.startswith("model.")]
    assert main(["train", "--recipe", "quick", "--output", str(out), "--initial-checkpoint", str(initial)]
                + [a for o in overrides for a in ("-o", o)]) == 0
    finished = load_weights(out / "best.safetensors")
    initial.unlink()
    first = checkpoint_dirs(out)[0]  # step 18 of 20: two more steps to train
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", str(first)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_weights"] == f"initial weights from {initial} (at the run's start)"
    resumed = load_weights(out / "best.safetensors")
    assert resumed.keys() == finished.keys()


def test_detect_and_segment_take_initial_checkpoint_like_train(tmp_path):
    """One name for one thing: the dense tasks' backbone weights are model.initial_checkpoint (--initial-checkpoint),
    which takes what sdt train's takes (a shipped tag here); the former key model.pretrained still loads."""
    import warnings

    from sdt.cli import build_parser
    from sdt.engine import load_config
    from sdt.tasks.dense import build_backbone, check_backbone_config
    from sdt.tasks.segment import SegmentConfig

    args = build_parser().parse_args(["segment", "--initial-checkpoint", TAG])
    assert args.initial_checkpoint == TAG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(SegmentConfig, "segment-mosaic", [f"model.pretrained={TAG}"])
    assert cfg.model.initial_checkpoint == TAG
    assert any("model.pretrained is deprecated; it is read as model.initial_checkpoint" in str(w.message) for w in caught)
    check_backbone_config(cfg.model)
    backbone = build_backbone(cfg.model)
    shipped = load_weights(weights_file(TAG))
    body = dict(backbone.body.named_parameters()) if hasattr(backbone, "body") else None
    assert body is not None, "the FPN backbone keeps the classifier's trunk as .body"
    key = "stages.2.blocks.0.attn.q.weight"  # timm's features_only wrapper names the stages stages_<i>
    torch.testing.assert_close(body["stages_2.blocks.0.attn.q.weight"], shipped[key].float())
    missing = load_config(SegmentConfig, "segment-mosaic", [f"model.initial_checkpoint={tmp_path / 'none.pt'}"])
    with pytest.raises(ConfigError, match="model.initial_checkpoint: .*none.pt is neither a weights file"):
        check_backbone_config(missing.model)
