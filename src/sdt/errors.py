"""Every error type of sdt, in one place. Each means bad input: a config, data, file or name that
cannot work, with a message that names the problem and the fix. The ``sdt`` command prints them as
one line; any other exception is a bug and keeps its traceback.
"""


class SdtError(Exception):
    """Bad input to sdt: the message names the problem and how to fix it."""


class ConfigError(SdtError, ValueError):
    """A recipe, override or argument that does not fit the config schema or cannot work."""


class DataError(SdtError, ValueError):
    """Data that cannot be trained on: missing files, wrong channels or sizes, bad labels or targets."""


class CheckpointError(SdtError, ValueError):
    """A weights or checkpoint file that is missing, truncated, or not from this kind of model or run."""


class DecayVariantError(SdtError, ValueError):
    """An unknown decay variant name; the message lists the valid ones."""
