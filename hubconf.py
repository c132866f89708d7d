"""torch.hub entry points for sdt's models, from a checkout of this repository.

    model = torch.hub.load("path/to/sdt", "sdt_h_tiny", source="local", num_classes=10)
    model = torch.hub.load("path/to/sdt", "sdt_h_nano", source="local", pretrained=True, tag="fmnist_e30")
    model = torch.hub.load("path/to/sdt", "sdt_h_tiny", source="local", checkpoint_path="best.safetensors")

One entry point per model that sdt registers with timm (sdt_h_*, rmt_*, sdt_vit_*); keyword arguments go to
``timm.create_model``. Weights come only from local files: ``pretrained=True`` takes the weights shipped in
src/sdt/weights (``sdt_h_nano``'s tags ``fmnist_e30`` and ``fmnist``) and ``checkpoint_path`` any weights file
sdt reads (safetensors, or a torch file read with weights_only=True); nothing is downloaded.
"""
import os
import sys

dependencies = ["torch", "timm", "safetensors", "yaml"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if "sdt" not in sys.modules:  # this checkout's sdt, not another installed copy
    sys.path.insert(0, _SRC)
    try:
        import sdt  # noqa: F401  (registers the models with timm)
    finally:
        sys.path.remove(_SRC)
import timm  # noqa: E402


def _registered() -> list:
    """The timm model names whose entry points live in the sdt package."""
    return sorted(name for name in timm.list_models()
                  if timm.models.model_entrypoint(name).__module__.split(".")[0] == "sdt")


def _entry(name: str):
    def entry(pretrained: bool = False, tag: str = "", checkpoint_path: str = "", **kwargs):
        if checkpoint_path:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"checkpoint_path: no such file: {checkpoint_path}")
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint_path), **kwargs)
        if not pretrained:
            return timm.create_model(name, **kwargs)
        full = f"{name}.{tag}" if tag else name
        if tag and full not in timm.list_pretrained(f"{name}.*"):
            raise ValueError(f"{name} has no tag {tag!r}; tags with shipped weights: {_shipped(name) or 'none'}")
        cfg = timm.models.get_pretrained_cfg(full)
        if not (cfg.file and os.path.isfile(cfg.file)):
            shipped = _shipped(name)
            hint = f"pass tag= one of {shipped}, or " if shipped else ""
            raise ValueError(f"{full} has no weights shipped with sdt (and torch.hub.load of sdt never downloads): "
                             f"{hint}pass checkpoint_path=FILE")
        return timm.create_model(full, pretrained=True, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"timm.create_model({name!r}, **kwargs); pretrained=True takes the shipped weights of `tag`, "
                     f"checkpoint_path=FILE a local weights file.")
    return entry


def _shipped(name: str) -> list:
    tags = []
    for full in timm.list_pretrained(f"{name}.*"):
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg is not None and cfg.file and os.path.isfile(cfg.file):
            tags.append(full.split(".", 1)[1])
    return tags


for _name in _registered():
    globals()[_name] = _entry(_name)
