"""Deployment: ONNX export checked with onnxruntime, TorchScript, and loading local weights.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``), opset 17, with dynamic batch,
height and width axes: the exported graph rebuilds masks and rotary tables from the input size,
so one file serves every resolution. (The dynamo exporter in torch 2.14 fails on these models:
its decomposition turns a reshape of a transposed tensor with symbolic sizes into an invalid view.)
Export always runs the ``reference`` attention backend, the one made of standard ops.
"""
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from ..attention import reference_backend
from ..errors import CheckpointError, require_extra
from ..files import atomic_path, load_into, save_weights
from ..models.registry import check_model_name
from ..tasks.pretrained import read_weights_for

ONNX_OPSET = 17


def create_model_from_weights(name: str, weights: str = "", **kwargs) -> nn.Module:
    """``timm.create_model`` with weights from a local file (``sdt.files.load_weights``:
    safetensors, or a torch checkpoint read with ``weights_only=True``, so no pickled code runs).
    RMT's released checkpoints work too: SDT-H/RMT models pass them through ``checkpoint_filter_fn``.
    No network access. A file that does not fit is a ``CheckpointError`` naming the fix."""
    model = timm.create_model(name, **kwargs)
    if weights:
        try:
            load_rmt_or_own_weights(model, weights)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (model {name} with {kwargs or 'its default arguments'}: check the model "
                                  f"name, --num-classes and --in-chans)") from e
    return model


def load_rmt_or_own_weights(model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """Load a weights file strictly into ``model``, RMT's key names converted for SDT-H/RMT models
    (gates absent from RMT's checkpoints start at RMT's decay). Returns the state dict loaded."""
    state = read_weights_for(model, Path(path))
    load_into(model, state, path)
    return state


def export_onnx(model: nn.Module, path: str, input_size: Tuple[int, int, int] = (3, 224, 224),
                opset: int = ONNX_OPSET) -> Path:
    """Export ``model`` (eval mode) to ONNX with dynamic batch/height/width; written atomically.

    Returns the path written. The graph's input is "image" (B, C, H, W), its output "logits".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.randn(2, *input_size)
    with atomic_path(path) as tmp, reference_backend(model), torch.no_grad():
        torch.onnx.export(
            model, (example,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        )
    return path


def check_onnx(model: nn.Module, path: str, input_shapes: Sequence[Tuple[int, int, int, int]]) -> List[Dict]:
    """Run the ONNX file with onnxruntime and PyTorch on random inputs of each (B, C, H, W) shape.

    Returns one dict per shape with the largest absolute difference of the outputs.
    """
    require_extra("onnxruntime", "export", "checking an ONNX export")
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    model.eval()
    for shape in input_shapes:
        x = torch.randn(*shape)
        with torch.no_grad(), reference_backend(model):
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        results.append(dict(shape=tuple(shape), max_abs_diff=(got - expected).abs().max().item(),
                            max_abs_output=expected.abs().max().item()))
    return results


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile ``model`` (eval mode) for deployments that still use TorchScript."""
    model.eval()
    with reference_backend(model):
        return torch.jit.script(model)


def save_torchscript(model: nn.Module, path: str) -> Path:
    """TorchScript-compile ``model`` (``script_model``) and save it atomically. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = script_model(model)
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))
    return path


def convert_rmt_checkpoint(src: str, model: nn.Module, out: str) -> Dict[str, int]:
    """Load an RMT checkpoint (RMT's released key names, optionally under "model") into ``model``
    through its checkpoint filter, and save the model's weights as safetensors (atomically).

    Works for ``rmt_*`` (exact) and ``sdt_h_*`` (gates start at RMT's decay). Returns counts of
    the loaded and gate-initialised tensors.
    """
    state = load_rmt_or_own_weights(model, src)
    save_weights(out, model.state_dict())
    gates = sum(1 for k in state if ".attn.gate." in k)
    return dict(tensors=len(state), gate_tensors=gates)


def export_command(name: str, weights: str, output: str, fmt: str, num_classes: Optional[int] = None,
                   in_chans: Optional[int] = None, input_size: Optional[Sequence[int]] = None,
                   check: bool = True) -> Iterator[str]:
    """``sdt export``: the model ``name`` (with local ``weights``) as ONNX, checked with onnxruntime at
    two shapes unless ``check`` is False, or as TorchScript; yields the lines to print as it goes."""
    check_model_name(name)
    if fmt == "onnx":  # before the model is built or anything written
        require_extra("onnx", "export", "sdt export --format onnx")
        if check:
            require_extra("onnxruntime", "export", "checking the ONNX export (or pass --no-check)")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    model = create_model_from_weights(name, weights, **kwargs).eval()
    chans = model.in_chans
    height, width = input_size or model.pretrained_cfg["input_size"][1:]
    if fmt == "torchscript":
        yield f"wrote {save_torchscript(model, output)} (TorchScript)"
        return
    path = export_onnx(model, output, (chans, height, width))
    yield f"wrote {path} (ONNX opset 17, dynamic batch/height/width)"
    if check:
        shapes = [(2, chans, height, width), (1, chans, height + height // 2 + 3, width + 5)]
        for r in check_onnx(model, path, shapes):
            yield (f"onnxruntime vs PyTorch at {r['shape']}: max |diff| {r['max_abs_diff']:.2e} "
                   f"(max |output| {r['max_abs_output']:.2e})")
