"""Dense prediction on sdt's backbones: torchvision detectors and a Semantic-FPN segmenter.

Any timm model with ``features_only`` support (every registered ``sdt_h_*`` / ``rmt_*`` /
``*_full2d`` model, and timm's CNNs) becomes a torchvision detection backbone: timm's feature
extractor, NHWC features turned NCHW, then torchvision's ``FeaturePyramidNetwork``. The result has
``out_channels`` and returns an ``OrderedDict`` of maps, which is what
``torchvision.models.detection.FasterRCNN / MaskRCNN / RetinaNet / FCOS`` expect::

    backbone = create_backbone("sdt_h_nano", in_chans=1, out_indices=(0, 1, 2, 3), fpn_channels=64,
                               model_kwargs={"stem_stride": 4})
    detector = create_detector("fasterrcnn", backbone, num_classes=11, canvas=128)
    segmenter = create_segmenter(create_backbone("rmt_nano", in_chans=1), num_classes=11)

``tv_resnet18`` (and ``tv_resnet34/50``) is torchvision's own ResNet-FPN
(``backbone_utils.resnet_fpn_backbone``, trainable BatchNorm), the usual baseline.

Options a detection user expects: ``pretrained`` (a local weights file: ours as safetensors, or RMT's
released checkpoints converted or raw, read without running code; the classification head is
dropped, the detector's heads start fresh), ``frozen_stages`` (mmdetection's meaning: -1 nothing,
0 the stem, n the stem and the first n stages) and ``norm_eval`` (every norm layer of the
backbone stays in eval mode with frozen affine parameters). Images must have sides that are
multiples of the backbone's stride (``DataError`` otherwise); the detectors pad to that multiple.

Labels: the detectors use torchvision's convention, class 0 is background, so ``num_classes``
counts it (10 Fashion-MNIST classes -> ``num_classes=11``, labels 1..10). The segmenter's class 0
is the background class of the semantic map.
"""
import math
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from ..errors import CheckpointError, ConfigError, DataError
from ..files import load_weights

__all__ = ["TimmFPNBackbone", "SemanticFPNHead", "SegmentationModel", "create_backbone", "create_detector",
           "create_segmenter", "load_backbone_weights", "DETECTORS"]

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
EXTRA_BLOCKS = ("maxpool", "p6p7", "none")
TORCHVISION_RESNETS = ("tv_resnet18", "tv_resnet34", "tv_resnet50")

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _extra_block(kind: str, channels: int) -> Optional[ExtraFPNBlock]:
    if kind not in EXTRA_BLOCKS:
        raise ConfigError(f"extra_blocks must be one of {', '.join(EXTRA_BLOCKS)}, got {kind!r}")
    return {"maxpool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(channels, channels), "none": None}[kind]


def check_stride(x: Tensor, stride: int) -> None:
    """``DataError`` unless the sides of images ``x`` (..., H, W) are multiples of ``stride``."""
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise DataError(f"image size {h}x{w} is not a multiple of the backbone's stride {stride}; "
                        f"pad or resize the images to a multiple of {stride} "
                        f"(e.g. {-(-h // stride) * stride}x{-(-w // stride) * stride})")


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


class TimmFPNBackbone(nn.Module):
    """A timm feature extractor (``features_only=True``) under torchvision's ``FeaturePyramidNetwork``.

    ``forward``: images (B, C, H, W), H and W multiples of ``stride`` -> ``OrderedDict``
    ``{"0": (B, D, H/s0, W/s0), "1": ..., ["pool" | "p6", "p7"]}`` with D = ``out_channels`` and
    s_i = ``strides[i]``. ``strides`` lists the stride of every returned map, extra levels included.

    Args:
        body: a timm ``features_only`` model (list output); NHWC features (``output_fmt``) are permuted.
        out_channels: FPN width D.
        extra_blocks: "maxpool" (one more level, stride x2: Faster/Mask R-CNN's P6), "p6p7" (two conv
            levels: RetinaNet's), or "none".
        frozen_stages, norm_eval: see the module docstring.
    """

    def __init__(self, body: nn.Module, out_channels: int = 64, extra_blocks: str = "maxpool",
                 frozen_stages: int = -1, norm_eval: bool = False):
        super().__init__()
        self.body = body
        info = body.feature_info
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        self.fpn = FeaturePyramidNetwork(list(info.channels()), out_channels, extra_blocks=_extra_block(extra_blocks, out_channels))
        self.out_channels = out_channels
        self.in_channels = list(info.channels())
        self.feature_names = [str(i) for i in range(len(self.in_channels))]
        reductions = list(info.reduction())
        extra = {"maxpool": 1, "p6p7": 2, "none": 0}[extra_blocks]
        self.strides = reductions + [reductions[-1] * 2 ** (k + 1) for k in range(extra)]
        self.stride = reductions[-1]
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self._frozen = self._frozen_modules(frozen_stages)
        for module in self._frozen:
            _freeze(module)
        if norm_eval:
            for module in self.body.modules():
                if isinstance(module, _NORMS):
                    _freeze(module)

    def _frozen_modules(self, frozen_stages: int) -> List[nn.Module]:
        """The body's top-level children that ``frozen_stages`` freezes: everything before the first
        stage (the stem), then one stage per count; stages are children named like ``stages_*`` /
        ``layer*`` (timm flattens ``stages.0`` to ``stages_0``)."""
        if frozen_stages < 0:
            return []
        children = list(self.body.named_children())
        stage_positions = [i for i, (name, _) in enumerate(children) if re.match(r"(stages?_?\d+|layer\d+)$", name)]
        if not stage_positions:
            raise ConfigError(f"frozen_stages: cannot find the stages of {type(self.body).__name__} "
                              f"(children {[n for n, _ in children]}); use frozen_stages=-1")
        if frozen_stages > len(stage_positions):
            raise ConfigError(f"frozen_stages={frozen_stages}, but the backbone has {len(stage_positions)} stages "
                              f"(-1: none, 0: the stem, up to {len(stage_positions)})")
        end = stage_positions[0] if frozen_stages == 0 else stage_positions[frozen_stages - 1] + 1
        return [module for _, module in children[:end]]

    def train(self, mode: bool = True) -> "TimmFPNBackbone":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        if self.norm_eval:
            for module in self.body.modules():
                if isinstance(module, _NORMS):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        check_stride(x, self.stride)
        features = self.body(x)
        if self.nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return self.fpn(OrderedDict(zip(self.feature_names, features)))


class _TorchvisionResNetFPN(nn.Module):
    """torchvision's ``BackboneWithFPN`` on a ResNet, with the attributes of ``TimmFPNBackbone``."""

    def __init__(self, name: str, in_chans: int, out_indices: Sequence[int], out_channels: int,
                 extra_blocks: str, frozen_stages: int, norm_eval: bool):
        super().__init__()
        from torchvision.models import resnet
        from torchvision.models.detection.backbone_utils import BackboneWithFPN

        if any(i not in (0, 1, 2, 3) for i in out_indices):
            raise ConfigError(f"out_indices {tuple(out_indices)} for {name}: choose among 0..3 (layer1..layer4)")
        if frozen_stages > 4:
            raise ConfigError(f"frozen_stages={frozen_stages}, but {name} has 4 stages (-1: none, 0: the stem, up to 4)")
        net = getattr(resnet, name[3:])(weights=None, norm_layer=nn.BatchNorm2d)
        if in_chans != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        # torchvision's _resnet_fpn_extractor, with our FPN width (it fixes 256) and mmdetection's frozen_stages
        if frozen_stages >= 0:
            for module in [net.conv1, net.bn1] + [getattr(net, f"layer{i}") for i in range(1, frozen_stages + 1)]:
                _freeze(module)
        self._frozen = [net.conv1, net.bn1] + [getattr(net, f"layer{i}") for i in range(1, frozen_stages + 1)] \
            if frozen_stages >= 0 else []
        in_channels = [net.inplanes // 8 * 2 ** i for i in out_indices]
        fpn = BackboneWithFPN(net, {f"layer{i + 1}": str(k) for k, i in enumerate(out_indices)}, in_channels,
                              out_channels, extra_blocks=_extra_block(extra_blocks, out_channels))
        self.fpn_backbone = fpn
        self.out_channels = out_channels
        reductions = [4 * 2 ** i for i in out_indices]
        extra = {"maxpool": 1, "p6p7": 2, "none": 0}[extra_blocks]
        self.strides = reductions + [reductions[-1] * 2 ** (k + 1) for k in range(extra)]
        self.stride = reductions[-1]
        self.feature_names = [str(i) for i in range(len(out_indices))]
        self.norm_eval = norm_eval
        if norm_eval:
            for module in fpn.body.modules():
                if isinstance(module, _NORMS):
                    _freeze(module)

    def train(self, mode: bool = True) -> "_TorchvisionResNetFPN":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        if self.norm_eval:
            for module in self.fpn_backbone.body.modules():
                if isinstance(module, _NORMS):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        check_stride(x, self.stride)
        return self.fpn_backbone(x)


def _body_key(top_level: set, key: str) -> str:
    """A key of the features_only body as the full model names it (timm joins ``stages.0`` as ``stages_0``)."""
    top, _, rest = key.partition(".")
    if top in top_level:
        return key
    return top.replace("_", ".", 1) + "." + rest


def load_backbone_weights(body: nn.Module, name: str, path: str, in_chans: int, model_kwargs: Dict[str, Any]) -> Dict[str, int]:
    """Load a classification checkpoint into a features_only ``body``; the head's tensors are dropped.

    ``path``: our ``.safetensors`` (a run's best/model weights, ``sdt convert`` output) or RMT's released
    ``.pth`` (renamed by ``checkpoint_filter_fn``); read by ``sdt.files.load_weights`` (no code runs).
    Every tensor of the body must be in the file with its shape, else ``CheckpointError``.
    Returns ``{"loaded": n, "dropped": m}`` (m: head tensors and others outside the body).
    """
    state = load_weights(path)
    template = timm.create_model(name, in_chans=in_chans, **model_kwargs)
    from .sdt_h import SpatialDecayTransformer, checkpoint_filter_fn

    if isinstance(template, SpatialDecayTransformer):
        try:
            state = checkpoint_filter_fn(state, template)
        except ValueError as e:
            raise CheckpointError(f"{path} does not fit {name}: {e}") from e
    top_level = {n for n, _ in template.named_children()}
    own = body.state_dict()
    missing, wrong = [], []
    for key, value in own.items():
        src = state.get(_body_key(top_level, key))
        if src is None:
            missing.append(key)
        elif src.shape != value.shape:
            wrong.append(f"{key} {tuple(src.shape)} vs {tuple(value.shape)}")
    if missing or wrong:
        raise CheckpointError(f"{path} does not fit the {name} backbone (in_chans={in_chans}, {model_kwargs}): "
                              f"{len(missing)} missing tensors {missing[:3]}, {len(wrong)} shape mismatches (file vs "
                              f"model) {wrong[:3]}. Was it trained with another model, in_chans or stem?")
    body.load_state_dict({key: state[_body_key(top_level, key)] for key in own})
    return {"loaded": len(own), "dropped": len(state) - len(own)}


def create_backbone(name: str, in_chans: int = 3, out_indices: Optional[Sequence[int]] = None,
                    fpn_channels: int = 64, extra_blocks: str = "maxpool", pretrained: Optional[str] = None,
                    frozen_stages: int = -1, norm_eval: bool = False,
                    model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A detection backbone with FPN (``out_channels`` = ``fpn_channels``) from a timm model name.

    Args:
        name: ``sdt_h_*``, ``rmt_*``, ``*_full2d`` or any timm model with features_only; or
            ``tv_resnet18/34/50`` (torchvision's ResNet-FPN).
        out_indices: which feature levels of the model feed the FPN (default: all of them).
        pretrained: a local weights file (see ``load_backbone_weights``); None: random init.
        model_kwargs: more ``timm.create_model`` arguments (e.g. ``{"stem_stride": 4}``, ``drop_path_rate``).
    """
    model_kwargs = dict(model_kwargs or {})
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be at least 1, got {fpn_channels}")
    if name in TORCHVISION_RESNETS:
        if model_kwargs:
            raise ConfigError(f"model arguments {model_kwargs} are for timm models; {name} (torchvision's ResNet) takes "
                              f"none: drop them (e.g. -o model.kwargs={{}})")
        if pretrained is not None:
            raise ConfigError(f"pretrained weights for {name}: not supported (no network); use a timm resnet "
                              f"(e.g. resnet18) with a local file instead")
        return _TorchvisionResNetFPN(name, in_chans, tuple(out_indices or (0, 1, 2, 3)), fpn_channels, extra_blocks,
                                     frozen_stages, norm_eval)
    if ":" not in name and not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models() + list(TORCHVISION_RESNETS), n=3, cutoff=0.6)
        raise ConfigError(f"unknown backbone {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
    kwargs = dict(features_only=True, in_chans=in_chans, **model_kwargs)
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    try:
        body = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, IndexError, AssertionError) as e:
        raise ConfigError(f"cannot build the {name} feature extractor with out_indices={out_indices} and "
                          f"{model_kwargs}: {e}") from e
    if pretrained is not None:
        load_backbone_weights(body, name, pretrained, in_chans, model_kwargs)
    return TimmFPNBackbone(body, fpn_channels, extra_blocks, frozen_stages, norm_eval)


def _anchors(strides: Sequence[int], single: bool) -> AnchorGenerator:
    """Anchors of 4 strides (x 2^(0, 1/3, 2/3)) per level, ratios 0.5/1/2; FCOS: one stride-sized point per level."""
    if single:
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    sizes = tuple(tuple(int(round(4 * s * 2 ** (k / 3))) for k in range(3)) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def _float32(value: Any) -> Any:
    """``value`` with every floating tensor in it (nested tuples, lists, dicts) cast to float32."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def _float32_predictions(detector: nn.Module) -> nn.Module:
    """Make the box and class predictions of ``detector``'s heads float32 under autocast.

    torchvision decodes boxes in the dtype of the predicted offsets (``BoxCoder.decode_single``), and
    bf16 has an 8-bit mantissa: under bf16 autocast every box coordinate in [128, 256) px would be a
    whole pixel, in [512, 1024) a multiple of 4, which costs mAP at strict IoUs and quantises the
    proposals the second stage trains on. The heads still compute in bf16; only their outputs (offsets
    near 0, where bf16 is precise) are cast, so decoding, NMS and the losses run in float32. Forward
    hooks keep torchvision's parameter names, so weights load as they are."""
    for head in prediction_heads(detector):
        head.register_forward_hook(_float32_outputs)
    return detector


def prediction_heads(detector: nn.Module) -> List[nn.Module]:
    """The modules whose outputs torchvision decodes into boxes and scores: the RPN head and the box
    predictor of an R-CNN, the head of RetinaNet / FCOS."""
    return [detector.rpn.head, detector.roi_heads.box_predictor] if hasattr(detector, "rpn") else [detector.head]


def _float32_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    return _float32(output)


def create_detector(kind: str, backbone: nn.Module, num_classes: int, canvas: int,
                    image_mean: Sequence[float] = FASHION_MNIST_MEAN, image_std: Sequence[float] = FASHION_MNIST_STD,
                    box_head_dim: int = 1024, **kwargs: Any) -> nn.Module:
    """A torchvision detector on ``backbone`` for ``canvas`` x ``canvas`` images (no resizing).

    Input (torchvision's API): a list of (C, H, W) float images in [0, 1] (normalised by the model with
    ``image_mean/std``, one value per channel); in training also a list of targets
    ``{"boxes": (N, 4) float xyxy pixels, "labels": (N,) int64 in [1, num_classes), ["masks": (N, H, W) uint8]}``.
    Output: a dict of losses in training; in eval a list of ``{"boxes", "labels", "scores", ["masks": (N, 1, H, W)]}``.

    ``kind``: fasterrcnn, maskrcnn, retinanet or fcos. ``num_classes`` counts the background (class 0).
    Anchors are sized to the backbone's strides (``_anchors``). ``box_head_dim``: width of the R-CNN box
    head's two fully connected layers (torchvision: 1024; on small images and few classes 256 does the
    same job at a quarter of the head's cost). ``kwargs`` go to the torchvision class.
    """
    if kind not in DETECTORS:
        raise ConfigError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must count the background too (>= 2), got {num_classes}")
    stride = backbone.stride
    if canvas < stride or canvas % stride:
        raise ConfigError(f"canvas {canvas} must be a positive multiple of the backbone's stride {stride} "
                          f"(e.g. {max(1, round(canvas / stride)) * stride})")
    common = dict(min_size=canvas, max_size=canvas, image_mean=list(image_mean), image_std=list(image_std),
                  size_divisible=stride, **kwargs)
    names = backbone.feature_names
    if kind in ("fasterrcnn", "maskrcnn"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        anchors = _anchors(backbone.strides, single=False)
        heads = dict(box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_head_dim),
                     box_predictor=FastRCNNPredictor(box_head_dim, num_classes))
        if kind == "fasterrcnn":
            detector = FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=pool, **heads, **common)
        else:
            mask_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

            # torchvision's default mask head and predictor, built here because the box predictor is ours
            mask_head = MaskRCNNHeads(backbone.out_channels, (256, 256, 256, 256), 1)
            detector = MaskRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=pool, mask_roi_pool=mask_pool,
                                mask_head=mask_head, mask_predictor=MaskRCNNPredictor(256, 256, num_classes), **heads,
                                **common)
    elif kind == "retinanet":
        detector = RetinaNet(backbone, num_classes, anchor_generator=_anchors(backbone.strides, single=False), **common)
    else:
        if backbone.out_channels % 32:
            raise ConfigError(f"FCOS's head normalises with GroupNorm(32 groups): the FPN width (fpn_channels="
                              f"{backbone.out_channels}) must be a multiple of 32")
        detector = FCOS(backbone, num_classes, anchor_generator=_anchors(backbone.strides, single=True), **common)
    return _float32_predictions(detector)


# ---------------------------------------------------------------------------------------------
# Segmentation


class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019; the head PVT and
    RMT report ADE20K with): each FPN level goes through (conv3x3 -> GroupNorm -> ReLU -> 2x upsample)
    until it reaches the finest level's stride, the levels are summed, and a 1x1 conv predicts classes.

    ``forward``: maps ``{"0": (B, D, H/s0, W/s0), "1": (B, D, H/s1, W/s1), ...}`` (strides s_i = s0 * 2^i;
    extra levels are ignored) -> logits (B, num_classes, H/s0, W/s0).
    """

    def __init__(self, in_channels: int, strides: Sequence[int], num_classes: int, channels: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 1
        self.strides = list(strides)
        self.branches = nn.ModuleList()
        for stride in self.strides:
            ups = max(int(round(math.log2(stride / self.strides[0]))), 0)
            layers: List[nn.Module] = []
            for k in range(max(ups, 1)):
                layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
                if ups:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: "OrderedDict[str, Tensor]") -> Tensor:
        maps = list(features.values())[:len(self.branches)]
        x = self.branches[0](maps[0])
        for branch, f in zip(self.branches[1:], maps[1:]):
            x = x + branch(f)
        return self.classifier(self.dropout(x))


class SegmentationModel(nn.Module):
    """Backbone + FPN + ``SemanticFPNHead``: images (B, C, H, W) in [0, 1] (normalised inside with
    ``mean/std``) -> logits (B, num_classes, H, W) (the head's output upsampled bilinearly).
    H and W must be multiples of ``backbone.stride`` (``DataError``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_channels: int = 64,
                 mean: Sequence[float] = FASHION_MNIST_MEAN, std: Sequence[float] = FASHION_MNIST_STD):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        levels = len(backbone.feature_names)
        self.head = SemanticFPNHead(backbone.out_channels, backbone.strides[:levels], num_classes, head_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.mean.shape[1]:
            raise DataError(f"expected images (B, {self.mean.shape[1]}, H, W), got {tuple(images.shape)}")
        logits = self.head(self.backbone((images - self.mean) / self.std))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def create_segmenter(backbone: nn.Module, num_classes: int, head_channels: int = 64,
                     mean: Sequence[float] = FASHION_MNIST_MEAN, std: Sequence[float] = FASHION_MNIST_STD) -> SegmentationModel:
    """A ``SegmentationModel`` (Semantic-FPN head) on ``backbone``; ``num_classes`` includes the background."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    if len(mean) != len(std):
        raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel each")
    return SegmentationModel(backbone, num_classes, head_channels, mean, std)

