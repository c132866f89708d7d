"""SDT-H and RMT: hierarchical vision transformers with spatial-decay attention.

Papers:
    SDT: "Learning Spatial Decay for Vision Transformers", Mao et al., AAAI 2026 (arXiv 2508.09525)
    RMT: "RMT: Retentive Networks Meet Vision Transformers", Fan et al., CVPR 2024 (arXiv 2309.11523)

One architecture serves both families; they differ only in the decay (``decay="cag"`` for SDT,
``"fixed"`` for RMT) and in which stages use the decomposed (rows, then columns) layout:

    image (B, C_in, H, W)
    -> Stem: 4 convs, stride 4 (or 2), BN            -> (B, H/4, W/4, C1)   [NHWC from here on]
    -> 4 stages; stages 2-4 start with a stride-2 conv + BN downsample
       block: x += CPE(x) (dw 3x3); x += ls1 * Attn(LN(x)); x += ls2 * FFN(LN(x))
       FFN: fc1 -> GELU -> (+ dw 3x3 conv) -> fc2
    -> head: Linear(C4 -> 1024) per token, BN, Swish, global average pool, Linear(1024 -> classes)

``sdt_h_*_full2d`` (ours) use full 2D decay in every stage; ``layouts="full"`` does the same for any
model. The chunked attention backend makes this affordable: it never materialises the (L, L) bias.

Any input height and width works: the stride-2 convs (kernel 3, padding 1) map a side s to
ceil(s / 2), and masks and rotary tables are built from each stage's actual grid. Nothing is padded.

The model table (parameters, GFLOPs, papers' numbers) is printed by ``sdt models``.
"""
import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models import PretrainedCfg, resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from ..attention import SpatialDecayAttention, rotary_tables
from ..layers import add_into, depthwise_residual, linear_act
from ..data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = ["SpatialDecayTransformer", "checkpoint_filter_fn", "rmt_config_to_kwargs"]


def _to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _add_residual(x: Tensor, update: Tensor) -> Tensor:
    """x + update for a residual stream ``x`` that the caller owns (no one else holds it).

    Without autograd x takes the sum in place. With it, x is kept for the backward of the
    LayerNorm that read it, so ``update`` takes it (``add_into``).
    """
    if not torch.is_grad_enabled():
        return x.add_(update)
    return add_into(update, x)


# Leaves for torch.fx (timm's tracer and plain symbolic_trace): they branch on the grad mode, dtypes
# and devices, which a traced graph must decide when it runs, not when it was traced.
for _name in ("_add_residual", "add_into", "depthwise_residual", "linear_act"):  # wrap patches this module's names
    torch.fx.wrap(_name)
register_notrace_function(_add_residual)
del _name


class Stem(nn.Module):
    """RMT's convolutional stem: (B, C_in, H, W) -> (B, ceil(H/s), ceil(W/s), C) with s = 4 or 2.

    conv3x3 s2 (C_in -> C/2) BN GELU, conv3x3 (C/2) BN GELU, conv3x3 s2 (-> C) BN GELU, conv3x3 BN.
    With ``stride=2`` the third conv keeps the resolution (a 28x28 image gives a 14x14 grid).
    """

    def __init__(self, in_chans: int, dim: int, stride: int = 4):
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"stem_stride must be 2 or 4, got {stride}")
        half = dim // 2
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, stride // 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last memory throughout: oneDNN's convolutions read and write it as it is, where on NCHW
        # memory each one reorders to its own blocked layout and back (sdt_h_tiny's training step took 7%
        # longer at 224 px, and inference 5% in a process that page-faults those buffers in afresh each
        # call; docs/benchmarks.md, section 5). The NHWC output is then a view of contiguous memory: the
        # residual stream of every block keeps that layout (an elementwise op follows its first operand),
        # so LayerNorm and the Linears run on it without a copy.
        return _to_nhwc(self.conv(x.contiguous(memory_format=torch.channels_last))).contiguous()


class Downsample(nn.Module):
    """Stride-2 conv3x3 + BN between stages: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.BatchNorm2d(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return _to_nhwc(self.norm(self.conv(_to_nchw(x)))).contiguous()  # as Stem: contiguous NHWC


class ConvFFN(nn.Module):
    """RMT's FFN: fc1 -> GELU -> h + dwconv3x3(h) -> fc2, on (B, H, W, C)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            x = self.act(self.fc1(x))
            return self.fc2(add_into(_to_nhwc(self.dwconv(_to_nchw(x))), x))
        if type(self.act) is nn.GELU and self.act.approximate == "none":  # fused into the GEMM in inference
            x = linear_act(x, self.fc1.weight, self.fc1.bias, "gelu")
        else:
            x = self.act(self.fc1(x))
        return linear_act(depthwise_residual(self.dwconv, x, x), self.fc2.weight, self.fc2.bias)


class SpatialDecayBlock(nn.Module):
    """CPE, then pre-LN attention and FFN residuals with optional layerscale: (B, H, W, C) -> same."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 3.0,
            decay: str = "cag",
            layout: str = "full",
            init_value: float = 2.0,
            heads_range: float = 4.0,
            alpha: str = "learned",
            attn_backend: str = "auto",
            drop_path: float = 0.0,
            ls_init_value: Optional[float] = None,
    ):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialDecayAttention(
            dim, num_heads, decay=decay, layout=layout, init_value=init_value,
            heads_range=heads_range, alpha=alpha, backend=attn_backend)
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, int(mlp_ratio * dim))
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, rotary: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        # from here on x is the block's own tensor
        if torch.jit.is_scripting():
            x = add_into(_to_nhwc(self.cpe(_to_nchw(x))), x)
        else:
            x = depthwise_residual(self.cpe, x, x)
        x = _add_residual(x, self.drop_path1(self.ls1(self.attn(self.norm1(x), rotary))))
        return _add_residual(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class SpatialDecayStage(nn.Module):
    """Optional stride-2 downsample, then ``depth`` blocks sharing one rotary table.

    (B, H, W, C_in) -> (B, H', W', C) with H' = ceil(H / 2) when downsampling.
    """

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            num_heads: int,
            downsample: bool,
            drop_path: Sequence[float],
            ls_init_value: Optional[float] = None,
            **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.head_dim = dim_out // num_heads
        self.downsample = Downsample(dim, dim_out) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            SpatialDecayBlock(dim_out, num_heads, drop_path=drop_path[i], ls_init_value=ls_init_value, **block_kwargs)
            for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        # in the activations' dtype (bf16 under autocast, as q and k are): no float32 round trip per rotation
        sin, cos = rotary_tables((x.shape[1], x.shape[2]), self.head_dim, x.device)
        rotary = (sin.to(x.dtype), cos.to(x.dtype))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, rotary)
            else:
                x = block(x, rotary)
        return x


class ProjectionHead(nn.Module):
    """RMT's head: per-token Linear(C -> P), BN, Swish, global pool, dropout, Linear(P -> classes).

    (B, H, W, C) -> (B, classes); (B, P) with ``pre_logits``; (B, H, W, P) with no pooling.
    """

    def __init__(self, in_features: int, num_classes: int, projection_dim: int = 1024,
                 pool_type: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(in_features, projection_dim)
        self.norm = nn.BatchNorm2d(projection_dim)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(drop_rate)
        self.pool_type = pool_type
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        self.num_features = projection_dim * self.global_pool.feat_mult()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type is not None:
            self.pool_type = pool_type
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
            self.num_features = self.proj.out_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        # contiguous: a strided (B, H, W, C) input makes Linear a bmm over a copy of the weight per (b, h)
        x = self.act(self.norm(_to_nchw(self.proj(x.contiguous()))))
        if self.pool_type == "":
            return _to_nhwc(x)
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


def _per_stage(value: Union[Any, Sequence[Any]], name: str, num_stages: int) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f"{name} has {len(value)} entries but the model has {num_stages} stages")
        return tuple(value)
    return (value,) * num_stages


class SpatialDecayTransformer(nn.Module):
    """SDT-H / RMT backbone with RMT's projection head.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: "avg", "max", "avgmax", "catavgmax" or "" (no pooling).
        embed_dims, depths, num_heads, init_values, heads_ranges, mlp_ratios: per stage, as RMT.
        layouts: per stage "decomposed" or "full" (a single string applies to every stage).
        decay: a name of ``sdt.decay.DECAY_VARIANTS``: "cag" (SDT), "fixed" (RMT), "learned", "content"
            or "none"; per stage or one for all.
        alpha: "learned" or "fixed" scale of the data-dependent decays.
        layerscales: per stage, whether blocks use layerscale (init ``layer_init_value``).
        projection_dim: width of the head's projection (RMT: 1024).
        stem_stride: 4 (RMT) or 2 (for small images).
        attn_backend: spatial-decay attention backend for every block (see ``sdt.backends``).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            num_heads: Sequence[int] = (4, 4, 8, 16),
            init_values: Union[float, Sequence[float]] = 2.0,
            heads_ranges: Union[float, Sequence[float]] = (4, 4, 6, 6),
            mlp_ratios: Union[float, Sequence[float]] = 3.0,
            layouts: Union[str, Sequence[str]] = ("decomposed", "decomposed", "full", "full"),
            decay: Union[str, Sequence[str]] = "cag",
            alpha: str = "learned",
            layerscales: Union[bool, Sequence[bool]] = False,
            layer_init_value: float = 1e-6,
            projection_dim: int = 1024,
            stem_stride: int = 4,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            attn_backend: str = "auto",
    ):
        super().__init__()
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        init_values = _per_stage(init_values, "init_values", num_stages)
        heads_ranges = _per_stage(heads_ranges, "heads_ranges", num_stages)
        mlp_ratios = _per_stage(mlp_ratios, "mlp_ratios", num_stages)
        layouts = _per_stage(layouts, "layouts", num_stages)
        decays = _per_stage(decay, "decay", num_stages)
        layerscales = _per_stage(layerscales, "layerscales", num_stages)
        for name, values in (("embed_dims", embed_dims), ("num_heads", num_heads)):
            _per_stage(values, name, num_stages)

        self.stem = Stem(in_chans, embed_dims[0], stem_stride)
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, sum(depths))  # CPU math: works under meta
        self.feature_info = []
        self.stages = nn.Sequential()
        prev_dim, reduction, first_block = embed_dims[0], stem_stride, 0
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            self.stages.append(SpatialDecayStage(
                prev_dim, embed_dims[i], depths[i], num_heads[i],
                downsample=i > 0,
                drop_path=drop_path_rates[first_block:first_block + depths[i]],
                ls_init_value=layer_init_value if layerscales[i] else None,
                mlp_ratio=mlp_ratios[i],
                decay=decays[i],
                layout=layouts[i],
                init_value=init_values[i],
                heads_range=heads_ranges[i],
                alpha=alpha,
                attn_backend=attn_backend,
            ))
            prev_dim = embed_dims[i]
            first_block += depths[i]
            self.feature_info.append(dict(num_chs=prev_dim, reduction=reduction, module=f"stages.{i}"))

        self.num_features = prev_dim
        self.head = ProjectionHead(prev_dim, num_classes, projection_dim, global_pool, drop_rate)
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """RMT's init: Linear trunc_normal(0.02) and zero bias; LayerNorm (1, 0); convs PyTorch default."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Gate biases and alphas set the decay itself; like norms they get no weight decay."""
        return {n for n, _ in self.named_parameters() if n.endswith(("gate.bias", "gate.alpha"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward that also returns the outputs of the selected stages.

        Args:
            x: (B, C_in, H, W) images.
            indices: take the last n stages if int, all if None, or these stage indices.
            norm: unused (the model has no final norm before the head), kept for timm's API.
            stop_early: stop after the last requested stage.
            output_fmt: "NCHW" or "NHWC" for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(_to_nchw(x).contiguous() if output_fmt == "NCHW" else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.head = ProjectionHead(self.num_features, 0, self.head.proj.out_features, "")
            self.num_classes = 0
            self.head_hidden_size = self.head.num_features
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, H/32, W/32, C4) (NHWC)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _rmt_key(key: str) -> Optional[str]:
    """Map one key of RMT's released ``VisRetNet`` state dict to ours (None: drop it)."""
    if ".Relpos." in key:
        return None  # decay rates and rotary angles are recomputed from the config
    key = key.replace("patch_embed.proj.", "stem.conv.")
    match = re.match(r"layers\.(\d+)\.downsample\.(reduction|norm)\.(.*)", key)
    if match:  # RMT downsamples at the end of stage s, we at the start of stage s + 1
        part = "conv" if match.group(2) == "reduction" else "norm"
        return f"stages.{int(match.group(1)) + 1}.downsample.{part}.{match.group(3)}"
    key = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
    for old, new in (
            (".retention.q_proj.", ".attn.q."), (".retention.k_proj.", ".attn.k."),
            (".retention.v_proj.", ".attn.v."), (".retention.out_proj.", ".attn.proj."),
            (".retention.lepe.conv.", ".attn.lce."), (".pos.conv.", ".cpe."),
            (".ffn.dwconv.conv.", ".mlp.dwconv."), (".ffn.", ".mlp."),
            (".retention_layer_norm.", ".norm1."), (".final_layer_norm.", ".norm2."),
            (".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")):
        key = key.replace(old, new)
    for old, new in (("proj.", "head.proj."), ("norm.", "head.norm."), ("head.", "head.fc.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: SpatialDecayTransformer) -> Dict[str, Tensor]:
    """Load RMT's released checkpoints (or ours) into any ``SpatialDecayTransformer``.

    Accepts the raw state dict or RMT's ``{"model": ...}`` wrapper. RMT's keys are renamed
    (see ``_rmt_key``), its (1, 1, 1, C) layerscale gammas flattened, and its ``Relpos.decay``
    buffers checked against the model's own decay rates (a mismatch means the wrong config).
    Our own checkpoints pass through unchanged. In both cases, gate parameters absent from the
    checkpoint (RMT weights into an SDT model) keep the model's
    initial values, which reproduce RMT's decay exactly, so SDT starts where RMT ended.
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out: Dict[str, Tensor] = {}
    ours = any(k.startswith("stem.conv.") for k in state_dict)
    for key, value in state_dict.items():
        if ours:
            out[key] = value
            continue
        relpos = re.match(r"layers\.(\d+)\.Relpos\.decay$", key)
        if relpos:
            gate = model.stages[int(relpos.group(1))].blocks[0].attn.gate
            if not torch.allclose(value.float().cpu(), gate.fixed_rates.cpu(), atol=1e-6):
                raise ValueError(
                    f"{key} = {value.tolist()} does not match this model's decay rates "
                    f"{gate.fixed_rates.tolist()}: build the model with the checkpoint's init_values/heads_ranges")
            continue
        new_key = _rmt_key(key)
        if new_key is None:
            continue
        if new_key.endswith(("ls1.gamma", "ls2.gamma")):
            value = value.reshape(-1)
        out[new_key] = value
    for key, value in model.state_dict().items():
        if ".attn.gate." in key and key not in out:
            out[key] = value
    return out


def rmt_config_to_kwargs(rmt_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Translate the constructor arguments of RMT's ``VisRetNet`` into ``SpatialDecayTransformer``'s.

    The result builds the RMT model (fixed decay, RMT's layouts); add ``decay="cag"`` for SDT.
    """
    known = {"in_chans", "num_classes", "embed_dims", "depths", "num_heads", "init_values", "heads_ranges",
             "mlp_ratios", "drop_path_rate", "chunkwise_recurrents", "projection", "layerscales",
             "layer_init_values", "use_checkpoints", "norm_layer", "patch_norm"}
    unknown = set(rmt_kwargs) - known
    if unknown:
        raise ValueError(f"unknown RMT constructor arguments {sorted(unknown)}")
    kwargs = {k: rmt_kwargs[k] for k in ("in_chans", "num_classes", "embed_dims", "depths", "num_heads",
                                         "init_values", "heads_ranges", "mlp_ratios", "drop_path_rate")
              if k in rmt_kwargs}
    if "chunkwise_recurrents" in rmt_kwargs:
        kwargs["layouts"] = tuple("decomposed" if c else "full" for c in rmt_kwargs["chunkwise_recurrents"])
    if "projection" in rmt_kwargs:
        kwargs["projection_dim"] = rmt_kwargs["projection"]
    if "layerscales" in rmt_kwargs:
        kwargs["layerscales"] = tuple(rmt_kwargs["layerscales"])
    if "layer_init_values" in rmt_kwargs:
        kwargs["layer_init_value"] = rmt_kwargs["layer_init_values"]
    kwargs["decay"] = "fixed"
    return kwargs


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv.0", "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


_nano_cfg = dict(input_size=(3, 64, 64), pool_size=(4, 4), crop_pct=1.0)
_fmnist_cfg = dict(num_classes=10, input_size=(1, 28, 28), pool_size=(2, 2), crop_pct=1.0,
                   mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")

default_cfgs = generate_default_cfgs({
    "sdt_h_nano": _cfg(**_nano_cfg),
    # Shipped with the package (scripts/ship_weights.py): `sdt train --recipe fashion-mnist` weights, the in-domain
    # Fashion-MNIST FID extractors (docs/generation.md). fmnist_e30: the recipe's 30 epochs, the default extractor;
    # fmnist: 12 epochs, the extractor of the FIDs published before it (kept so they can be reproduced).
    "sdt_h_nano.fmnist_e30": _cfg(file=os.path.join(_WEIGHTS_DIR, "sdt_h_nano_fmnist_e30.safetensors"), **_fmnist_cfg),
    "sdt_h_nano.fmnist": _cfg(file=os.path.join(_WEIGHTS_DIR, "sdt_h_nano_fmnist.safetensors"), **_fmnist_cfg),
    "sdt_h_tiny": _cfg(),
    "sdt_h_small": _cfg(),
    "sdt_h_base": _cfg(),
    "sdt_h_large": _cfg(),
    "sdt_h_nano_full2d": _cfg(**_nano_cfg),
    "sdt_h_tiny_full2d": _cfg(),
    "sdt_h_small_full2d": _cfg(),
    "sdt_h_base_full2d": _cfg(),
    "sdt_h_large_full2d": _cfg(),
    "rmt_nano": _cfg(**_nano_cfg),
    "rmt_tiny": _cfg(),
    "rmt_small": _cfg(),
    "rmt_base": _cfg(),
    "rmt_large": _cfg(),
})
# timm makes the first tag with weights the default, which would turn plain "sdt_h_nano" into the
# 1-channel 10-class extractor; keep the untagged (ImageNet-shaped, random-init) config the default.
default_cfgs["sdt_h_nano"].tags.remove("")
default_cfgs["sdt_h_nano"].tags.appendleft("")


def _local_weight_shapes(cfg: PretrainedCfg) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor shapes of the weights ``cfg`` points at when they are local (``state_dict=`` or ``file=``).

    safetensors headers are read without loading the tensors; torch files go through
    ``sdt.files.load_weights`` (``weights_only``; a bad file is a ``CheckpointError``). None for
    remote sources (url, hf-hub) and for local-dir, whose config.json timm writes from the model itself.
    """
    from ..files import load_weights  # not at import time: models/ stays free of file I/O helpers

    if cfg.source in ("hf-hub", "local-dir"):  # timm's own precedence (_resolve_pretrained_source)
        return None
    if cfg.state_dict is not None:
        state = cfg.state_dict
    elif cfg.file:
        path = Path(cfg.file)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception:  # let the loader name the problem (missing, truncated, not safetensors)
                load_weights(path)
                raise
        state = load_weights(path)
    else:
        return None
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's load_state_dict order
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}


def _cfg_for_local_weights(cfg: PretrainedCfg, kwargs: Dict[str, Any]) -> PretrainedCfg:
    """Make ``num_classes`` and the input channels of ``cfg`` those of its local weights file.

    timm keeps a checkpoint's classifier only when the model's num_classes equals the cfg's, and
    adapts the first conv from the cfg's ``input_size[0]`` channels. A file given by
    ``pretrained_cfg_overlay=dict(file=...)`` keeps the registry cfg (1000 classes, 3 channels),
    so our own 10-class weights lost their head. Reading both from the file fixes that: its head
    and channels become the defaults, and a different ``num_classes`` is a fine-tune (fresh head,
    with a warning).
    """
    shapes = _local_weight_shapes(cfg)
    if shapes is None:
        return cfg
    updates: Dict[str, Any] = {}
    head = shapes.get("head.fc.weight", shapes.get("head.weight"))  # ours, RMT's
    if (head[0] if head else 0) != cfg.num_classes:
        updates["num_classes"] = head[0] if head else 0
    stem = shapes.get("stem.conv.0.weight", shapes.get("patch_embed.proj.0.weight"))
    if stem is not None and cfg.input_size and stem[1] != cfg.input_size[0]:
        updates["input_size"] = (stem[1], *cfg.input_size[1:])
    cfg = dataclasses.replace(cfg, **updates)
    wanted = kwargs.get("num_classes", cfg.num_classes)
    if head and wanted != cfg.num_classes and not kwargs.get("features_only"):
        warnings.warn(
            f"the pretrained weights have a {cfg.num_classes}-class head and the model {wanted} classes: "
            f"building a fresh {wanted}-class head (fine-tuning); pass num_classes={cfg.num_classes} to keep it",
            stacklevel=3)
    return cfg


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
        kwargs["pretrained_cfg"] = _cfg_for_local_weights(cfg, kwargs)
    return build_model_with_cfg(
        SpatialDecayTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# RMT's released sizes (RMT, Fan et al., CVPR 2024, and its released classfication_release/RMT.py).
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                 heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), drop_path_rate=0.1,
                 rmt_layouts=("decomposed", "decomposed", "full", "full")),
    "small": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), drop_path_rate=0.15,
                  rmt_layouts=("decomposed", "decomposed", "decomposed", "full")),
    "base": dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                 heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3), drop_path_rate=0.4,
                 layerscales=(False, False, True, True),
                 rmt_layouts=("decomposed", "decomposed", "decomposed", "full")),
    "large": dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                  heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3), drop_path_rate=0.5,
                  layerscales=(False, False, True, True),
                  rmt_layouts=("decomposed", "decomposed", "decomposed", "full")),
    # Ours, for 28-64 px images on a CPU: RMT-T's shape at half the width (head size 16 as in
    # RMT-T's early stages), depth 6 in stage 3 and a 512-wide head; stem stride 2 so that a
    # 28x28 image keeps a 14x14 grid in stage 1 and a 2x2 grid in stage 4. 3.58M parameters
    # (1000 classes).
    "nano": dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                 heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), drop_path_rate=0.05,
                 projection_dim=512, stem_stride=2,
                 rmt_layouts=("decomposed", "decomposed", "full", "full")),
}
SDT_H_LAYOUTS = ("decomposed", "decomposed", "full", "full")  # the SDT paper: stages 1-2 decomposed


def _family_args(size: str, family: str, **kwargs: Any) -> Dict[str, Any]:
    args = dict(SIZES[size])
    rmt_layouts = args.pop("rmt_layouts")
    if family == "rmt":
        args.update(decay="fixed", layouts=rmt_layouts)
    elif family == "sdt_full2d":  # ours: full 2D decay in every stage, practical with the chunked backend
        args.update(decay="cag", layouts="full")
    else:
        args.update(decay="cag", layouts=SDT_H_LAYOUTS)
    args.update(kwargs)
    return args


@register_model
def sdt_h_nano(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_nano", pretrained, **_family_args("nano", "sdt", **kwargs))


@register_model
def sdt_h_tiny(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_tiny", pretrained, **_family_args("tiny", "sdt", **kwargs))


@register_model
def sdt_h_small(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_small", pretrained, **_family_args("small", "sdt", **kwargs))


@register_model
def sdt_h_base(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_base", pretrained, **_family_args("base", "sdt", **kwargs))


@register_model
def sdt_h_large(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_large", pretrained, **_family_args("large", "sdt", **kwargs))


@register_model
def sdt_h_nano_full2d(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_nano_full2d", pretrained, **_family_args("nano", "sdt_full2d", **kwargs))


@register_model
def sdt_h_tiny_full2d(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_tiny_full2d", pretrained, **_family_args("tiny", "sdt_full2d", **kwargs))


@register_model
def sdt_h_small_full2d(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_small_full2d", pretrained, **_family_args("small", "sdt_full2d", **kwargs))


@register_model
def sdt_h_base_full2d(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_base_full2d", pretrained, **_family_args("base", "sdt_full2d", **kwargs))


@register_model
def sdt_h_large_full2d(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("sdt_h_large_full2d", pretrained, **_family_args("large", "sdt_full2d", **kwargs))


@register_model
def rmt_nano(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("rmt_nano", pretrained, **_family_args("nano", "rmt", **kwargs))


@register_model
def rmt_tiny(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("rmt_tiny", pretrained, **_family_args("tiny", "rmt", **kwargs))


@register_model
def rmt_small(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("rmt_small", pretrained, **_family_args("small", "rmt", **kwargs))


@register_model
def rmt_base(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("rmt_base", pretrained, **_family_args("base", "rmt", **kwargs))


@register_model
def rmt_large(pretrained: bool = False, **kwargs: Any) -> SpatialDecayTransformer:
    return _create("rmt_large", pretrained, **_family_args("large", "rmt", **kwargs))
