"""Model families. Importing this package registers every model with timm."""
from .sdt_h import SpatialDecayTransformer, checkpoint_filter_fn, rmt_config_to_kwargs
