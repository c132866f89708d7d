"""Parameter and FLOP counts, the papers' numbers and the list of this package's models (``sdt models``).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` and reported as
multiply-adds (one multiply-add = one FLOP), the convention of the RMT and SDT papers and of
fvcore. FlopCounterMode counts matmuls, convolutions and attention (we add the CPU flash-attention kernel
it does not know), always on the reference attention backend so that every model is counted
the same way; element-wise work
(softmax, norms, activations, the decay bias itself) is not counted, as in fvcore.
"""
from typing import Dict, List, Optional, Tuple

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..attention import reference_backend

# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA uses
# here, so attention would count as zero on a CPU.
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION_FLOPS = {_cpu_flash: _cpu_flash_flops}

# Numbers the papers report: (params in millions, GFLOPs at 224, ImageNet-1K top-1).
PAPER_NUMBERS: Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]] = {
    "rmt_tiny": (14.0, 2.5, 82.4),
    "rmt_small": (27.0, 4.5, 84.1),
    "rmt_base": (54.0, 9.7, 85.0),
    "rmt_large": (95.0, 18.2, 85.5),
    "sdt_h_tiny": (14.0, 2.7, 82.7),
    "sdt_h_small": (27.0, 4.8, 84.2),
    "sdt_h_base": (54.0, 10.8, 85.1),
}


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), *extra_inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass on a single (C, H, W) image, in eval mode.

    ``extra_inputs`` follow the image, for models with more inputs (a DiT's timestep and label, each of shape (1,)).
    Works on the meta device too (counts need shapes only).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter, reference_backend(model):
        model(torch.zeros(1, *input_size, device=device), *[t.to(device) for t in extra_inputs])
    model.train(was_training)
    return counter.get_total_flops() // 2


def list_sdt_models() -> List[str]:
    """Every model this package registers with timm, by family and then in registration order."""
    names = [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("sdt.")]
    order = {n: i for i, n in enumerate(timm.models._registry._model_entrypoints)}  # registration order
    return sorted(names, key=lambda n: (timm.models.model_entrypoint(n).__module__, order.get(n, 0)))
