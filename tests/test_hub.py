"""Sharing weights the timm way: save_for_hf / local-dir round trips, pretrained_cfg_overlay files,
and sdt.hub.export_run_to_hub for a finished training run."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import sdt  # noqa: F401  (registers the models)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh init (BN running stats too)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    return model.eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kwargs", [{}, dict(num_classes=10), dict(in_chans=1, num_classes=10), dict(in_chans=4),
                                    dict(num_classes=0)])
def test_save_for_hf_local_dir_round_trip_is_exact(tmp_path, kwargs):
    """timm's hub layout, as push_to_hf_hub writes it; ``pretrained=True`` loads the weights
    (without it timm builds the architecture from config.json with a fresh init, as for hf-hub:)."""
    model = _perturbed("sdt_h_nano", **kwargs)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    _assert_same_weights(model, loaded)
    assert loaded.num_classes == model.num_classes and loaded.in_chans == model.in_chans
    x = torch.randn(2, model.in_chans, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_overlay_file_keeps_a_10_class_head(tmp_path, in_chans):
    model = _perturbed("sdt_h_nano", num_classes=10, in_chans=in_chans)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    for extra in (dict(num_classes=10, in_chans=in_chans), {}):  # the file's head and channels are the defaults
        loaded = timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **extra)
        _assert_same_weights(model, loaded.eval())
        assert loaded.pretrained_cfg["num_classes"] == 10 and loaded.pretrained_cfg["input_size"][0] == in_chans
    torch.save(model.state_dict(), tmp_path / "weights.pth")  # a torch file works the same (weights_only)
    loaded = timm.create_model("sdt_h_nano", pretrained=True, num_classes=10, in_chans=in_chans,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.pth")))
    _assert_same_weights(model, loaded.eval())
    loaded = timm.create_model("sdt_h_nano", pretrained=True, num_classes=10, in_chans=in_chans,
                               pretrained_cfg_overlay=dict(state_dict=model.state_dict()))
    _assert_same_weights(model, loaded.eval())


def test_overlay_file_with_other_num_classes_resets_only_the_head(tmp_path):
    """Fine-tuning: another num_classes keeps the body and builds a fresh head, with a warning."""
    model = _perturbed("sdt_h_nano", num_classes=10)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.warns(UserWarning, match="10-class head.*num_classes=10"):
        loaded = timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   num_classes=5)
    assert loaded.num_classes == 5
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    for k, v in body.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_overlay_file_that_is_not_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        timm.create_model("sdt_h_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
