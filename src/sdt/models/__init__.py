"""Model families. Importing this package registers every model with timm."""
from .sdt_h import SpatialDecayTransformer, checkpoint_filter_fn, rmt_config_to_kwargs
from .vit import SpatialDecayViT, vit_checkpoint_filter_fn

__all__ = ["SpatialDecayTransformer", "SpatialDecayViT", "checkpoint_filter_fn", "rmt_config_to_kwargs", "vit_checkpoint_filter_fn"]
