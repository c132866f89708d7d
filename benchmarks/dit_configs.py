"""Parameters and GMACs of every DiT config with each attention kind (printed as a markdown table).

Counts use sdt.models.complexity (torch's FlopCounterMode, multiply-adds; the decay bias and softmax are
element-wise and not counted). Models are built on the meta device, so nothing is allocated.

    PYTHONPATH=src python benchmarks/dit_configs.py
"""
import torch

from sdt.models.complexity import count_flops, count_params
from sdt.models.dit import DIT_CONFIGS, create_dit


def main() -> None:
    print("| config | input (C, H, W) | tokens | params none | params cag | GMACs none | GMACs cag |")
    print("|---|---|---:|---:|---:|---:|---:|")
    t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    for name in DIT_CONFIGS:
        row = {}
        for attn in ("none", "cag"):
            with torch.device("meta"):
                model = create_dit(name, decay=attn)
            size = (model.in_channels, *model.x_embedder.img_size)
            row[attn] = (count_params(model), count_flops(model, size, t, y) / 1e9)
        tokens = (size[1] // model.patch_size) * (size[2] // model.patch_size)
        print(f"| `{name}` | {size} | {tokens} | {row['none'][0]:,} | {row['cag'][0]:,} | "
              f"{row['none'][1]:.3f} | {row['cag'][1]:.3f} |")


if __name__ == "__main__":
    main()
