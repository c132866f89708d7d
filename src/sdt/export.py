"""Deployment: ONNX export checked with onnxruntime, TorchScript, and loading local weights.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``), opset 17, with dynamic batch,
height and width axes: the exported graph rebuilds masks and rotary tables from the input size,
so one file serves every resolution. (The dynamo exporter in torch 2.14 fails on these models:
its decomposition turns a reshape of a transposed tensor with symbolic sizes into an invalid view.)
Export always runs the ``reference`` attention backend, the one made of standard ops.
"""
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import timm
import torch
from torch import nn

from .attention import reference_backend

ONNX_OPSET = 17


def create_model_from_weights(name: str, weights: str = "", **kwargs) -> nn.Module:
    """``timm.create_model`` with weights from a local file: safetensors, or a torch checkpoint read
    with ``weights_only=True`` (no pickled code runs). RMT's released checkpoints work too: SDT-H/RMT
    models pass them through ``checkpoint_filter_fn``. No network access."""
    model = timm.create_model(name, **kwargs)
    if not weights:
        return model
    from .models.sdt_h import SpatialDecayTransformer, checkpoint_filter_fn

    state = load_checkpoint_file(weights)
    if isinstance(model, SpatialDecayTransformer):
        state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights {weights!r} do not fit {name} with {kwargs or 'its default arguments'}: "
                         f"check the model name, --num-classes and --in-chans ({str(e).splitlines()[0]})") from e
    return model


def export_onnx(model: nn.Module, path: str, input_size: Tuple[int, int, int] = (3, 224, 224),
                opset: int = ONNX_OPSET) -> Path:
    """Export ``model`` (eval mode) to ONNX with dynamic batch/height/width; written atomically.

    Returns the path written. The graph's input is "image" (B, C, H, W), its output "logits".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.randn(2, *input_size)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with reference_backend(model), torch.no_grad():
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_onnx(model: nn.Module, path: str, input_shapes: Sequence[Tuple[int, int, int, int]]) -> List[Dict]:
    """Run the ONNX file with onnxruntime and PyTorch on random inputs of each (B, C, H, W) shape.

    Returns one dict per shape with the largest absolute difference of the outputs.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install 'sdt[export]'") from e
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


def load_checkpoint_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch checkpoint without running pickled code
    (``weights_only=True``; RMT's checkpoints also hold an ``argparse.Namespace``, allowed here)."""
    import argparse

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint (truncated, or not a state dict): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return state


def convert_rmt_checkpoint(src: str, model: nn.Module, out: str) -> Dict[str, int]:
    """Load an RMT checkpoint (RMT's released key names, optionally under "model") into ``model``
    through its checkpoint filter, and save the model's weights as safetensors (atomically).

    Works for ``rmt_*`` (exact) and ``sdt_h_*`` (gates start at RMT's decay). Returns counts of
    the loaded and gate-initialised tensors.
    """
    from safetensors.torch import save_file

    from .models.sdt_h import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_checkpoint_file(src), model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{src!r} does not fit this model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}; check the model size")
    tmp = f"{out}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    gates = sum(1 for k in state if ".attn.gate." in k)
    return dict(tensors=len(state), gate_tensors=gates)
