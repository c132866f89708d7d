"""SDT attention in a plain ViT: an isotropic transformer where attention is the only spatial mixer.

Papers:
    SDT: "Learning Spatial Decay for Vision Transformers", Mao et al., AAAI 2026 (arXiv 2508.09525)
    ViT: "An Image is Worth 16x16 Words", Dosovitskiy et al., ICLR 2021 (arXiv 2010.11929)

In SDT-H (``sdt.models.sdt_h``) the CPE, LCE and conv FFN carry most of the spatial information, so
the decay has little left to do. Here nothing but attention mixes tokens:

    image (B, C_in, H, W)
    -> PatchEmbed (timm): conv p x p, stride p (input padded to a multiple of p) -> (B, h, w, C)  [NHWC]
       h = ceil(H / p), w = ceil(W / p)
    -> + position embedding: "none", "learned" (B, h, w, C parameter at the cfg's grid, resampled
       bicubically to other grids) or "sincos" (fixed 2D sin-cos, built for the actual grid)
    -> depth x pre-norm block:
       x += Attn(LN(x))   SpatialDecayAttention, full 2D layout over all h*w tokens, no LCE,
                          rotary only with ``rotary=True``, decay ``decay=`` (see ``sdt.attention``)
       x += MLP(LN(x))    timm Mlp: fc1 -> GELU -> fc2
    -> LN -> global pool (avg by default) -> dropout -> Linear(C -> classes)

There is no class token: every token has a grid position, so the 2D decay applies to all of them.
No convolution follows the patch embedding. ``decay="none", pos_embed="none"`` is a ViT with no
position information at all (permutation-equivariant over patches); ``decay="none",
pos_embed="learned"`` is the standard ViT a user would pick instead of SDT.

Sizes: ``sdt_vit_fm_*`` are for 28x28 Fashion-MNIST images at patch 2 (a 14x14 grid of 196 tokens);
``sdt_vit_tiny/small/base`` follow ViT-Ti/S/B/16 at 224 (a 14x14 grid as well). The decay rates
are RMT's for its 14x14 stage (init_value 2, heads_range 6).
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import (DropPath, LayerScale, Mlp, PatchEmbed, SelectAdaptivePool2d, calculate_drop_path_rates,
                         register_notrace_function, resample_abs_pos_embed_nhwc, trunc_normal_)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..attention import SpatialDecayAttention, rotary_tables
from ..data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = ["SpatialDecayViT", "POS_EMBEDS", "sincos_pos_embed_2d", "vit_checkpoint_filter_fn"]

POS_EMBEDS = ("none", "learned", "sincos")


def sincos_pos_embed_2d(height: int, width: int, dim: int, device: Optional[torch.device] = None) -> Tensor:
    """Fixed 2D sin-cos position embedding (MAE's), as timm's ``build_sincos2d_pos_embed(feat_shape=
    [height, width], dim)`` computes it; written here because timm's version is not TorchScript-able.

    A quarter of the channels each: sin(row w_k), sin(col w_k), cos(row w_k), cos(col w_k) with
    w_k = 1 / 10000^(k / (dim / 4)).

    Returns:
        (height, width, dim) float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos position embedding needs embed_dim divisible by 4, got {dim}")
    bands = 1.0 / (10000.0 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4)))
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
    grid = torch.stack([rows, cols]).flatten(1).transpose(0, 1)  # (L, 2)
    phase = grid.unsqueeze(-1) * bands  # (L, 2, dim / 4)
    return torch.stack([torch.sin(phase), torch.cos(phase)], dim=1).flatten(1).view(height, width, dim)


def _add_learned_pos_embed(x: Tensor, pos_embed: Tensor) -> Tensor:
    """x: (B, h, w, C) + pos_embed (1, h0, w0, C), resampled (bicubic) when the grid differs."""
    if x.shape[1] != pos_embed.shape[1] or x.shape[2] != pos_embed.shape[2]:
        pos_embed = resample_abs_pos_embed_nhwc(pos_embed, [x.shape[1], x.shape[2]])
    return x + pos_embed.to(x.dtype)


def _add_sincos_pos_embed(x: Tensor) -> Tensor:
    """x: (B, h, w, C) + the sin-cos embedding of its own grid."""
    return x + sincos_pos_embed_2d(x.shape[1], x.shape[2], x.shape[3], x.device).to(x.dtype)


# Leaves for torch.fx (timm's tracer and plain symbolic_trace): they branch on the grid size.
for _name in ("_add_learned_pos_embed", "_add_sincos_pos_embed"):
    torch.fx.wrap(_name)
    register_notrace_function(globals()[_name])
del _name


class ViTBlock(nn.Module):
    """Pre-norm block: x += Attn(LN(x)); x += MLP(LN(x)), with optional layerscale: (B, h, w, C) -> same."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            decay: str = "cag",
            init_value: float = 2.0,
            heads_range: float = 6.0,
            alpha: str = "learned",
            rotary: bool = False,
            attn_backend: str = "auto",
            proj_drop: float = 0.0,
            drop_path: float = 0.0,
            ls_init_value: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialDecayAttention(
            dim, num_heads, decay=decay, layout="full", init_value=init_value, heads_range=heads_range,
            alpha=alpha, backend=attn_backend, lce_kernel_size=0, rotary=rotary)
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, rotary: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rotary)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class SpatialDecayViT(nn.Module):
    """Isotropic ViT with spatial-decay attention (see the module docstring).

    Args:
        img_size: the input size the learned position embedding is made for (other sizes resample it).
        patch_size: patch side p.
        in_chans: input image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: "avg", "max", "avgmax", "catavgmax" or "" (no pooling).
        embed_dim, depth, num_heads, mlp_ratio: width C, blocks, heads (C / heads even), MLP ratio.
        decay: "none", "fixed" (RMT), "learned", "cag" (SDT) or "content" (``sdt.attention.DECAYS``).
        pos_embed: "none", "learned" or "sincos" absolute position embedding.
        rotary: RMT's rotary embedding on q and k in every block.
        init_value, heads_range: RMT's per-head decay rates (and the gate's starting point).
        alpha: "learned" or "fixed" scale of the learned decays.
        ls_init_value: layerscale init (None: no layerscale).
        drop_rate, pos_drop_rate, proj_drop_rate, drop_path_rate: dropout before the classifier,
            after the position embedding, in the MLP, and stochastic depth (linear over depth).
        attn_backend: spatial-decay attention backend for every block (see ``sdt.backends``).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
            decay: str = "cag",
            pos_embed: str = "none",
            rotary: bool = False,
            init_value: float = 2.0,
            heads_range: float = 6.0,
            alpha: str = "learned",
            ls_init_value: Optional[float] = None,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            attn_backend: str = "auto",
    ):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose one of {POS_EMBEDS}")
        if pos_embed == "sincos" and embed_dim % 4 != 0:
            raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {embed_dim}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        self.pos_embed_type = pos_embed
        self.use_rotary = rotary
        self.head_dim = embed_dim // num_heads
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], embed_dim)) if pos_embed == "learned" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            ViTBlock(embed_dim, num_heads, mlp_ratio, decay=decay, init_value=init_value, heads_range=heads_range,
                     alpha=alpha, rotary=rotary, attn_backend=attn_backend, proj_drop=proj_drop_rate,
                     drop_path=drop_path_rates[i], ls_init_value=ls_init_value)
            for i in range(depth)])
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head_hidden_size = embed_dim * self.pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: Linear trunc_normal(0.02), zero bias; pos_embed trunc_normal(0.02); the gates
        keep their own init (W_g = 0: every decay starts at RMT's)."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The position embedding and the gates' biases and alphas (they set the decay itself)."""
        names = {n for n, _ in self.named_parameters() if n.endswith(("gate.bias", "gate.alpha"))}
        return names | ({"pos_embed"} if self.pos_embed is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            self.head_hidden_size = self.embed_dim * self.pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: Tensor) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """(B, C_in, H, W) -> tokens (B, h, w, C) with position embedding, and the rotary tables (or None)."""
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if pos_embed is not None:
            x = _add_learned_pos_embed(x, pos_embed)
        elif self.pos_embed_type == "sincos":
            x = _add_sincos_pos_embed(x)
        x = self.pos_drop(x)
        rotary: Optional[Tuple[Tensor, Tensor]] = None
        if self.use_rotary:
            sin, cos = rotary_tables((x.shape[1], x.shape[2]), self.head_dim, x.device)
            rotary = (sin.to(x.dtype), cos.to(x.dtype))
        return x, rotary

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward that also returns the outputs of the selected blocks.

        Args:
            x: (B, C_in, H, W) images.
            indices: take the last n blocks if int, all if None, or these block indices.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block.
            output_fmt: "NCHW" or "NHWC" for the intermediates, each (B, C, h, w) or (B, h, w, C).
            intermediates_only: return only the intermediates.

        Returns:
            intermediates, or (final features (B, h, w, C) after the norm, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, rotary = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, rotary)
            else:
                x = block(x, rotary)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and the final norm and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C) after the final norm (NHWC)."""
        x, rotary = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, rotary)
            else:
                x = block(x, rotary)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, h, w, C) -> (B, classes); (B, C) with ``pre_logits``; unpooled (B, h, w, C) with global_pool ""."""
        if self.global_pool == "":
            return x
        x = self.head_drop(self.pool(x.permute(0, 3, 1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def vit_checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: SpatialDecayViT) -> Dict[str, Tensor]:
    """Load our checkpoints into a ``SpatialDecayViT`` of another input size or input channels.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``; a learned position embedding of another
    grid is resampled (bicubic, timm's ``resample_abs_pos_embed_nhwc``); a patch embedding of another
    patch size is resampled with timm's ``resample_patch_embed`` (FlexiViT's pseudo-inverse).
    Gate parameters absent from the checkpoint keep the model's initial values (RMT's decay).
    """
    from timm.layers import resample_patch_embed

    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    own = model.state_dict()
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and key in own and value.shape != own[key].shape:
            value = resample_abs_pos_embed_nhwc(value, list(own[key].shape[1:3]))
        elif key == "patch_embed.proj.weight" and value.shape[-2:] != own[key].shape[-2:]:
            value = resample_patch_embed(value, list(own[key].shape[-2:]))
        out[key] = value
    for key, value in own.items():
        if ".attn.gate." in key and key not in out:
            out[key] = value
    return out


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# Fashion-MNIST sizes: 1 channel, 10 classes, 28x28 at patch 2 (14x14 tokens).
_fm_cfg = dict(num_classes=10, input_size=(1, 28, 28), pool_size=(14, 14), crop_pct=1.0,
               mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

default_cfgs = generate_default_cfgs({
    "sdt_vit_fm_tiny": _cfg(**_fm_cfg),
    "sdt_vit_fm_small": _cfg(**_fm_cfg),
    "sdt_vit_tiny": _cfg(),
    "sdt_vit_small": _cfg(),
    "sdt_vit_base": _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    out_indices = kwargs.pop("out_indices", 3)  # timm's ViT default: the last 3 blocks
    return build_model_with_cfg(
        SpatialDecayViT, variant, pretrained,
        pretrained_filter_fn=vit_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# embed_dim, depth, num_heads (head size even), patch and image size of each entry point.
SIZES: Dict[str, Dict[str, Any]] = {
    # Ours, sized for a 2-core CPU study on Fashion-MNIST (docs/vit_study.md): head size 16.
    "fm_tiny": dict(img_size=28, patch_size=2, embed_dim=64, depth=6, num_heads=4),
    "fm_small": dict(img_size=28, patch_size=2, embed_dim=128, depth=8, num_heads=4),
    # ViT-Ti/S/B/16 (DeiT's widths and depths), no class token.
    "tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
}


def _args(size: str, **kwargs: Any) -> Dict[str, Any]:
    return {**SIZES[size], **kwargs}


@register_model
def sdt_vit_fm_tiny(pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    return _create("sdt_vit_fm_tiny", pretrained, **_args("fm_tiny", **kwargs))


@register_model
def sdt_vit_fm_small(pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    return _create("sdt_vit_fm_small", pretrained, **_args("fm_small", **kwargs))


@register_model
def sdt_vit_tiny(pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    return _create("sdt_vit_tiny", pretrained, **_args("tiny", **kwargs))


@register_model
def sdt_vit_small(pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    return _create("sdt_vit_small", pretrained, **_args("small", **kwargs))


@register_model
def sdt_vit_base(pretrained: bool = False, **kwargs: Any) -> SpatialDecayViT:
    return _create("sdt_vit_base", pretrained, **_args("base", **kwargs))
