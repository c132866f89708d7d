"""Model names: a clear error for a name timm does not know."""
import difflib

import timm

from ..errors import ConfigError


def check_model_name(name: str) -> None:
    """A ``ConfigError`` for a model name timm does not know, suggesting the closest registered names.
    ``hf-hub:`` / ``local-dir:`` names are left to timm; a pretrained tag (``sdt_h_nano.fmnist``) is allowed."""
    if ":" in name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown model {name!r}; {hint}(`sdt models` lists this package's models, "
                      f"timm.list_models() every registered one)")
