"""DiT: class-conditional diffusion transformer whose attention is SDT's spatial-decay attention.

Papers:
    DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie, ICCV 2023 (arXiv 2212.09748)
    SDT: "Learning Spatial Decay for Vision Transformers", Mao et al., AAAI 2026 (arXiv 2508.09525)

DiT's architecture (facebookresearch/DiT ``models.py``) with one change: each block's attention is
``sdt.attention.SpatialDecayAttention`` over the patch grid, full 2D layout:

    x (B, C, H, W) -> patchify p x p -> (B, H/p, W/p, D) + 2D sin-cos position embedding
    c = timestep embedding(t) + label embedding(y)          (B, D); label dropout gives the null class
    N blocks, adaLN-Zero: shift/scale/gate from c for the attention and the MLP
    final layer: adaLN LayerNorm + Linear -> (B, H/p, W/p, p*p*C_out) -> unpatchify (B, C_out, H, W)

``decay``: a decay variant of ``sdt.decay.DECAY_VARIANTS``, spelt as for the backbones: "none"
(plain DiT attention), "fixed" (RMT's per-head decay), "cag" (SDT's data-dependent decay), or the
ablations "learned" and "content". "vanilla", DiT's old name for "none", is still read (saved
configs of older runs). Every variant uses DiT's absolute sin-cos embedding and no rotary and no
LCE (our choice), so that the decay bias is the only difference between them.

Configurations are created by name with ``create_dit`` (``dit_s_2`` ... ``dit_xl_8`` as in DiT,
``dit_n_*`` / ``dit_t_*`` for 28-32 px on a CPU). They are not timm models: DiT's forward takes
(x, t, y) and has no classifier head, so timm's ``create_model`` machinery (num_classes reset,
features_only, ``sdt models``' classifier table) does not apply; a plain registry keeps
``timm.list_models()`` for classifiers.
"""
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import Mlp, PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import checkpoint

from ..attention import SpatialDecayAttention
from ..decay import decay_variant

__all__ = ["DiT", "create_dit", "list_dits", "DIT_CONFIGS"]

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, H, W, D); shift, scale: (B, D)."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): sinusoidal frequencies (256) then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """DiT's (GLIDE's) embedding: [cos(t f), sin(t f)], f = max_period^(-k/half). (B,) -> (B, dim)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Index ``num_classes`` is the null class used by classifier-free guidance;
    in training, labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


GATE_INPUTS = ("modulated", "normalized")


class DiTBlock(nn.Module):
    """adaLN-Zero block on (B, H, W, D) conditioned on c (B, D).

    ``gate_input``: what a content-aware decay gate reads. "modulated" (default): the attention's input,
    ``LayerNorm(x) * (1 + scale(c)) + shift(c)``, as everything else in the block. "normalized":
    ``LayerNorm(x)`` without adaLN's shift and scale, so the decay cannot follow the timestep and label
    through them (issue 33's test of why CAG is worse in DiT, docs/generation.md).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, decay: str = "none",
                 init_value: float = 2.0, heads_range: float = 6.0, attn_backend: str = "auto",
                 gate_input: str = "modulated"):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"unknown gate_input {gate_input!r}; choose one of {GATE_INPUTS}")
        self.gate_input = gate_input
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SpatialDecayAttention(
            hidden_size, num_heads, decay=decay, layout="full", init_value=init_value, heads_range=heads_range,
            backend=attn_backend, lce_kernel_size=0, rotary=False)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        normalized = self.norm1(x)
        gate_tokens = normalized if self.gate_input == "normalized" else None
        x = x + gate_msa[:, None, None] * self.attn(modulate(normalized, shift_msa, scale_msa), gate_input=gate_tokens)
        x = x + gate_mlp[:, None, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN LayerNorm + Linear: (B, H, W, D) -> (B, H, W, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer with spatial-decay attention.

    Args:
        input_size: default image side (the position embedding is rebuilt for any other grid).
        patch_size: p; the image height and width must be multiples of it.
        in_channels: image channels C (1 or 3 for pixels, 4 for SD latents).
        hidden_size, depth, num_heads, mlp_ratio: transformer width D, blocks, heads, MLP ratio.
        decay: a name of ``sdt.decay.DECAY_VARIANTS``: "none" (no decay), "fixed" (RMT decay), "cag" (SDT
            decay), "learned" or "content"; "vanilla" is read as "none". ``self.decay`` holds the name.
        class_dropout_prob: label dropout for classifier-free guidance (0: no null class).
        num_classes: number of classes.
        learn_sigma: also predict the variance interpolation (output 2C channels).
        init_value, heads_range: RMT's per-head decay rates (and CAG's starting point).
        attn_backend: spatial-decay attention backend (see ``sdt.backends``).
        gate_input: what a content-aware gate reads, "modulated" (adaLN's output) or "normalized"
            (``LayerNorm(x)`` alone); see ``DiTBlock``.
        attn: the former name of ``decay`` (deprecated).
    """

    def __init__(
            self,
            input_size: int = 32,
            patch_size: int = 2,
            in_channels: int = 4,
            hidden_size: int = 1152,
            depth: int = 28,
            num_heads: int = 16,
            mlp_ratio: float = 4.0,
            decay: str = "cag",
            class_dropout_prob: float = 0.1,
            num_classes: int = 1000,
            learn_sigma: bool = True,
            init_value: float = 2.0,
            heads_range: float = 6.0,
            attn_backend: str = "auto",
            gate_input: str = "modulated",
            attn: Optional[str] = None,
    ):
        super().__init__()
        if attn is not None:
            warnings.warn("DiT(attn=...) is deprecated; pass decay=... (the backbones' name)", FutureWarning, stacklevel=2)
            decay = attn
        decay = decay_variant(decay).name
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.decay = decay
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True,
                                     strict_img_size=False, output_fmt="NHWC")
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", self.sincos_pos_embed((grid, grid)), persistent=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, decay, init_value, heads_range, attn_backend, gate_input)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (as timm's models)."""
        self.grad_checkpointing = enable

    def sincos_pos_embed(self, grid: Tuple[int, int]) -> Tensor:
        """Fixed 2D sin-cos embedding for an (H, W) patch grid: (H, W, D)."""
        return build_sincos2d_pos_embed(list(grid), self.hidden_size).reshape(*grid, self.hidden_size)

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linears (and patch conv), N(0, 0.02) embeddings, zero adaLN and output layers."""
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        for block in self.blocks:
            block.attn.gate.reset_parameters()  # the gate keeps its own init: W_g = 0, starts at RMT's decay
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, h, w, p*p*C) -> (B, C, h*p, w*p)"""
        batch, h, w, _ = x.shape
        p, c = self.patch_size, self.out_channels
        x = x.reshape(batch, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps (float or int); y: (B,) labels.

        Returns (B, C_out, H, W): epsilon (or velocity), followed by the variance channels with ``learn_sigma``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of patch_size={self.patch_size}; "
                             f"crop or pad the images")
        x = self.x_embedder(x)
        grid = (x.shape[1], x.shape[2])
        pos = self.pos_embed if tuple(self.pos_embed.shape[:2]) == grid else self.sincos_pos_embed(grid).to(x.device)
        x = x + pos.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, c)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: out = uncond + s * (cond - uncond) on all ``in_channels`` prediction channels.

        DiT's version guided only the first 3 channels (it assumed 4 latent channels); here the guided
        channels are the real image channels, and the learned-sigma channels come from the conditional pass.
        x, t, y: (B, ...) as ``forward``; the null class is appended internally. Returns (B, C_out, H, W).
        """
        if self.y_embedder.dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a model trained with class_dropout_prob > 0 (a null class)")
        null = torch.full_like(y, self.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        c = self.in_channels
        guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)


# DiT's sizes (depth, hidden, heads) and ours for 28-32 px images on a CPU.
DIT_SIZES: Dict[str, Dict[str, int]] = {
    "xl": dict(depth=28, hidden_size=1152, num_heads=16),
    "l": dict(depth=24, hidden_size=1024, num_heads=16),
    "b": dict(depth=12, hidden_size=768, num_heads=12),
    "s": dict(depth=12, hidden_size=384, num_heads=6),
    # Ours, for 28-32 px pixel-space images on a CPU (head size 32 and 24).
    "t": dict(depth=6, hidden_size=128, num_heads=4),
    "n": dict(depth=4, hidden_size=96, num_heads=4),
}
_SMALL_SIZES = ("t", "n")
DIT_CONFIGS: Dict[str, Dict[str, int]] = {
    f"dit_{size}_{patch}": dict(DIT_SIZES[size], patch_size=patch)
    for size in DIT_SIZES for patch in ((2, 4) if size in _SMALL_SIZES else (2, 4, 8))  # 8 does not divide 28
}
# Defaults for the CPU sizes: Fashion-MNIST-like images, pixel space, fixed variance.
_SMALL_DEFAULTS = dict(input_size=28, in_channels=1, num_classes=10, learn_sigma=False)


def list_dits() -> List[str]:
    """Names accepted by ``create_dit``."""
    return list(DIT_CONFIGS)


def create_dit(name: str, **kwargs: Any) -> DiT:
    """Build a DiT by name (``dit_s_2``, ``dit_xl_8``, ``dit_n_4`` ...); keyword arguments override the config.

    DiT sizes default to DiT's ImageNet-256 latent setting (32 px, 4 channels, 1000 classes, learned
    sigma); the CPU sizes ``n`` and ``t`` default to 28 px, 1 channel, 10 classes, fixed sigma.
    """
    key = name.lower().replace("-", "_").replace("/", "_")
    if key not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; choose one of {list_dits()}")
    args: Dict[str, Any] = dict(DIT_CONFIGS[key])
    if key.split("_")[1] in _SMALL_SIZES:
        args.update(_SMALL_DEFAULTS)
    args.update(kwargs)
    return DiT(**args)
