"""Look inside: decay, gate and attention maps of a spatial-decay model for one query location.

``attention_maps(model, image, query_xy)`` returns, per drawn layer (the last block of each stage of
an SDT-H/RMT model, or the last block of a plain ``sdt_vit_*``, by default) and head:

- ``gate``: G = logsigmoid(x W_g + b) over the grid (token-dependent decays only), (n, H, W);
- ``decay_fixed``: exp(lambda_h * d(q, j)), RMT's decay from the query, (n, H, W);
- ``decay``: exp(bias(q, j)) of the model's own decay (equal to ``decay_fixed`` for RMT, and for
  an SDT model at initialisation), (n, H, W);
- ``attn_plain`` / ``attn``: the query's attention weights without / with the decay, (n, H, W).

For decomposed stages the decay and attention are the ones the rows-then-columns computation
really applies: query (r, c) reaches token (r', c') through (r', c), so its weight is
A_col[c](r, r') * A_row[r'](c, c'), and its decay is the sum of the row and column biases.
``plot_attention_maps`` draws them over the image (matplotlib, PNG).
"""
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..attention import SpatialDecayAttention, apply_rotary, rotary_tables
from ..decay import decomposed_biases, full_2d_bias
from ..errors import ConfigError, DataError, require_extra
from ..models.registry import check_model_name

IMAGE_NAMES = ("astronaut", "chelsea", "coffee")


def load_image(source: str, size: Tuple[int, int], in_chans: int, mean: Sequence[float],
               std: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """Load an image file, a scikit-image sample (``astronaut``, ``chelsea``, ``coffee``) or a
    Fashion-MNIST test image (``fmnist:<index>``).

    Returns (model input (1, C, H, W) normalised, display image (H, W, 3) in [0, 1]).
    """
    import numpy as np
    from PIL import Image

    if source in IMAGE_NAMES:
        require_extra("skimage", "viz", f"the sample image {source!r} (scikit-image's)")
        from skimage import data

        pil = Image.fromarray(getattr(data, source)())
    elif source.startswith("fmnist:"):
        from ..data import fashion_mnist_tensors

        images, _ = fashion_mnist_tensors("test")
        index = source.split(":", 1)[1]
        if not index.isdigit() or int(index) >= len(images):
            raise DataError(f"{source!r}: give a Fashion-MNIST test image index 0..{len(images) - 1}, e.g. fmnist:7")
        pil = Image.fromarray(images[int(index), 0].numpy())
    else:
        if not Path(source).is_file():
            raise DataError(f"image {source!r} not found; give an image path, fmnist:<index> or one of {IMAGE_NAMES}")
        try:
            pil = Image.open(source)
            pil.load()
        except Exception as e:
            raise DataError(f"cannot read image {source!r} (not an image, or truncated?): {e}") from e
    pil = pil.convert("L" if in_chans == 1 else "RGB").resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    display = np.stack([array] * 3, -1) if in_chans == 1 else array
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if in_chans == 1 else tensor.permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((tensor - mean_t) / std_t)[None], torch.from_numpy(display)


def _query_maps(attn: SpatialDecayAttention, x: Tensor, query: Tuple[int, int]) -> Dict[str, Tensor]:
    """Maps of one attention module for one query cell, from its input x (1, H, W, C)."""
    height, width = x.shape[1], x.shape[2]
    r, c = query
    q, k = attn._heads(attn.q(x)), attn._heads(attn.k(x))
    if attn.use_rotary:
        sin, cos = rotary_tables((height, width), attn.head_dim, x.device)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
    q, k = q[0], k[0]  # (n, L, d)
    logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5  # (n, L, L)
    gate = attn.gate
    rates = gate(x)
    fixed = gate.fixed_rates.view(1, -1, 1)
    n = logits.shape[0]
    out: Dict[str, Tensor] = {}
    if gate.token_dependent:
        out["gate"] = gate.gate_map(x)[0].view(n, height, width)
    if attn.layout == "full":
        def bias_of(s: Optional[Tensor]) -> Tensor:
            return torch.zeros_like(logits) if s is None else full_2d_bias(s, height, width, attn.distance)[0]
        index = r * width + c
        bias, bias_fixed = bias_of(rates), bias_of(fixed)
        out["attn_plain"] = torch.softmax(logits[:, index], dim=-1)
        out["attn"] = torch.softmax(logits[:, index] + bias[:, index], dim=-1)
        out["decay"] = bias[:, index].exp()
        out["decay_fixed"] = bias_fixed[:, index].exp()
    else:
        grid_logits = logits.view(n, height, width, height, width)
        row_logits = torch.stack([grid_logits[:, i, :, i, :] for i in range(height)], 1)  # (n, H, W, W)
        col_logits = torch.stack([grid_logits[:, :, j, :, j] for j in range(width)], 1)  # (n, W, H, H)

        def decomposed(s: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
            if s is None:
                return torch.zeros_like(row_logits), torch.zeros_like(col_logits)
            row_bias, col_bias = decomposed_biases(s, height, width, attn.distance)
            return row_bias[0].transpose(0, 1).expand_as(row_logits), col_bias[0].transpose(0, 1).expand_as(col_logits)

        def effective(row_bias: Tensor, col_bias: Tensor) -> Tuple[Tensor, Tensor]:
            a_col = torch.softmax(col_logits[:, c, r] + col_bias[:, c, r], dim=-1)  # (n, H): query -> (r', c)
            a_row = torch.softmax(row_logits[:, :, c] + row_bias[:, :, c], dim=-1)  # (n, H, W): (r', c) -> (r', c')
            decay = (col_bias[:, c, r][:, :, None] + row_bias[:, :, c]).exp()
            return a_col[:, :, None] * a_row, decay

        zeros = decomposed(None)
        attn_plain, _ = effective(*zeros)
        attn_with, decay = effective(*decomposed(rates))
        _, decay_fixed = effective(*decomposed(fixed))
        out.update(attn_plain=attn_plain.flatten(1), attn=attn_with.flatten(1), decay=decay.flatten(1),
                   decay_fixed=decay_fixed.flatten(1))
    return {k: v.reshape(n, height, width) for k, v in out.items()}


def _attention_layers(model: nn.Module, block: Optional[int]) -> List[Tuple[str, SpatialDecayAttention]]:
    """(label, attention module) of the layers to draw: ``block`` of every stage of an SDT-H/RMT model,
    or of the one stack of blocks of a plain ViT (``sdt_vit_*``); every block when ``block`` is None."""
    stages = getattr(model, "stages", None)
    groups = [("stage", list(stage.blocks)) for stage in stages] if stages is not None else None
    if groups is None and isinstance(getattr(model, "blocks", None), nn.Sequential):
        groups = [("block", list(model.blocks))]
    if groups is None or not all(isinstance(getattr(b, "attn", None), SpatialDecayAttention) for _, bs in groups for b in bs):
        raise ConfigError(f"attention_maps needs an SDT-H/RMT model (with .stages) or an sdt_vit_* model (with .blocks), "
                          f"got {type(model).__name__}")
    layers = []
    for index, (kind, blocks) in enumerate(groups):
        if block is not None and not -len(blocks) <= block < len(blocks):
            raise ConfigError(f"block {block} does not exist: the {kind} has {len(blocks)} blocks "
                              f"(give -{len(blocks)}..{len(blocks) - 1}, or every block)")
        chosen = range(len(blocks)) if block is None else [block % len(blocks)]
        for b in chosen:
            label = f"stage {index + 1}" if kind == "stage" and block is not None else (
                f"stage {index + 1} block {b + 1}" if kind == "stage" else f"block {b + 1}")
            layers.append((label, blocks[b].attn))
    return layers


@torch.no_grad()
def attention_maps(model: nn.Module, image: Tensor, query_xy: Tuple[float, float],
                   block: Optional[int] = -1) -> List[Dict[str, Tensor]]:
    """Decay, gate and attention maps for the query at pixel (x, y) of ``image`` (1, C, H, W).

    ``block`` picks the block within each stage (SDT-H/RMT) or within the stack (``sdt_vit_*``);
    None draws every block. Returns one dict per drawn layer with the maps (n, h, w) described in the
    module docstring, plus ``query`` (row, col) on that layer's grid and ``label`` ("stage 2", "block 5").
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise DataError(f"image must be (1, C, H, W), got {tuple(image.shape)}")
    img_h, img_w = image.shape[-2:]
    qx, qy = query_xy
    if not (0 <= qx < img_w and 0 <= qy < img_h):
        raise ConfigError(f"query ({qx}, {qy}) lies outside the {img_w}x{img_h} image; give x in [0, {img_w}) and y in [0, {img_h})")
    layers = _attention_layers(model, block)
    inputs: Dict[int, Tensor] = {}
    hooks = [attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, (_, attn) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        model(image)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    results = []
    for i, (label, attn) in enumerate(layers):
        x = inputs[i]
        height, width = x.shape[1:3]
        query = (min(int(qy * height / img_h), height - 1), min(int(qx * width / img_w), width - 1))
        maps = _query_maps(attn, x, query)
        maps.update(query=query, label=label)
        results.append(maps)
    return results


def plot_attention_maps(maps: List[Dict[str, Tensor]], display: Tensor, query_xy: Tuple[float, float],
                        out_dir: str, title: str = "") -> List[Path]:
    """One PNG per drawn layer (stage1.png, block3.png, ...): a row per head; columns gate G, RMT decay, model decay, attention without and
    with the decay, each over the image with a colour bar and the query marked. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from ..engine.plots import save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img_h, img_w = display.shape[:2]
    columns = [("gate", "gate G = logsigmoid(xW+b)"), ("decay_fixed", "fixed decay exp(λd) (RMT)"),
               ("decay", "model decay exp(M)"), ("attn_plain", "attention, no decay"), ("attn", "attention with decay")]
    paths = []
    for stage_maps in maps:
        heads = stage_maps["attn"].shape[0]
        fig, axes = plt.subplots(heads, len(columns), figsize=(3.2 * len(columns), 2.8 * heads), squeeze=False)
        for h in range(heads):
            for col, (key, label) in enumerate(columns):
                ax = axes[h, col]
                ax.imshow(display.numpy(), extent=(0, img_w, img_h, 0))
                if key in stage_maps:
                    up = F.interpolate(stage_maps[key][h][None, None].float(), size=(img_h, img_w), mode="nearest")[0, 0]
                    im = ax.imshow(up.numpy(), cmap="magma", alpha=0.6, extent=(0, img_w, img_h, 0))
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
                else:
                    ax.text(img_w / 2, img_h / 2, "no gate\n(fixed decay)", ha="center", va="center", color="w")
                ax.plot(query_xy[0], query_xy[1], "x", color="cyan", markersize=9, mew=2)
                ax.set_xlabel("x (pixels)")
                ax.set_ylabel(f"head {h}\ny (pixels)")
                if h == 0:
                    ax.set_title(label, fontsize=9)
        grid = stage_maps["attn"].shape[1:]
        label = stage_maps["label"]
        fig.suptitle(f"{title} {label} ({grid[0]}x{grid[1]} grid), "
                     f"query at pixel {tuple(query_xy)} -> cell {stage_maps['query']}")
        fig.tight_layout()
        path = out / f"{label.replace(' ', '')}.png"
        save_figure(fig, path, dpi=80)
        paths.append(path)
    return paths


def warn_if_untrained(weights: str) -> None:
    if not weights:
        warnings.warn("no --weights given: the model is randomly initialised, so the gate still equals RMT's "
                      "fixed decay and the attention maps show nothing learned", stacklevel=2)


def viz_command(name: str, weights: str, image_source: str, size: Optional[Sequence[int]], query_text: Optional[str],
                block: Optional[int], out_dir: str, num_classes: Optional[int] = None,
                in_chans: Optional[int] = None) -> List[Path]:
    """``sdt viz``: the maps of model ``name`` (local ``weights``, or random with a warning) for the query
    ``"x,y"`` (default: the centre) of an image; returns the PNGs written."""
    from .export import create_model_from_weights

    check_model_name(name)
    warn_if_untrained(weights)
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    model = create_model_from_weights(name, weights, **kwargs).eval()
    cfg = model.pretrained_cfg
    size = tuple(size or cfg["input_size"][1:])
    mean, std = cfg["mean"], cfg["std"]
    if model.in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * model.in_chans, (sum(std) / len(std),) * model.in_chans
    image, display = load_image(image_source, size, model.in_chans, mean, std)
    if query_text:
        try:
            query = tuple(float(v) for v in query_text.split(","))
            assert len(query) == 2
        except (ValueError, AssertionError):
            raise ConfigError(f"--query must be 'x,y' in pixels, e.g. --query 14,10; got {query_text!r}") from None
    else:
        query = (size[1] / 2, size[0] / 2)
    maps = attention_maps(model, image, query, block)
    return plot_attention_maps(maps, display, query, out_dir, title=name)
