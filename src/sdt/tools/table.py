"""``sdt models``: every registered SDT/RMT model's parameters and MACs beside the papers' numbers."""
from typing import List, Optional, Tuple

import timm
import torch

from ..engine import progress_bar
from ..models.complexity import PAPER_NUMBERS, count_flops, count_params, list_sdt_models


def model_table(names: Optional[List[str]] = None, input_size: Tuple[int, int, int] = (3, 224, 224)) -> str:
    """A markdown table: parameters and GFLOPs (multiply-adds) of each model beside the papers' numbers."""
    names = names or list_sdt_models()
    lines = [
        f"| model | params | GMACs @{input_size[1]}x{input_size[2]} | paper params | paper GFLOPs | paper top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    bar = progress_bar(len(names), "counting FLOPs", unit="model")
    for name in names:
        bar.set_postfix_str(name)
        with torch.device("meta"):  # counts need shapes only: no weight init, no arithmetic (10x faster)
            model = timm.create_model(name, num_classes=1000, in_chans=input_size[0])
        paper = PAPER_NUMBERS.get(name, (None, None, None))
        cells = [f"{v:g}" + suffix if v is not None else "-" for v, suffix in zip(paper, ("M", "G", ""))]
        lines.append(f"| `{name}` | {count_params(model):,} | {count_flops(model, input_size) / 1e9:.2f} | " + " | ".join(cells) + " |")
        bar.update()
    bar.close()
    return "\n".join(lines)
