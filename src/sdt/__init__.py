"""sdt: Spatial Decay Transformers (SDT) and RMT for PyTorch, as timm models.

    import sdt, timm
    model = timm.create_model("sdt_h_tiny", num_classes=10)

Importing ``sdt`` registers every model with timm.
"""
from .attention import DecayGate, SpatialDecayAttention, apply_rotary, rotary_tables
from .backends import spatial_decay_attention
from .models import SpatialDecayTransformer, checkpoint_filter_fn, rmt_config_to_kwargs

__all__ = ["DecayGate", "SpatialDecayAttention", "SpatialDecayTransformer", "apply_rotary", "checkpoint_filter_fn",
           "rmt_config_to_kwargs", "rotary_tables", "spatial_decay_attention"]
__version__ = "0.1.0"
