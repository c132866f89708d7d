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


class MissingExtraError(SdtError, ImportError):
    """An optional dependency (one of pyproject's extras) that this use of sdt needs is not installed."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Import ``module`` (e.g. ``"onnx"``), or raise ``MissingExtraError`` naming the extra that installs it.

    sdt is installed from a checkout, not from a package index, so the message names the commands
    that work there: ``pip install -e '.[extra]'`` or ``bash scripts/setup.sh extra``."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed ({e}): in the sdt checkout run "
            f"pip install -e '.[{extra}]' (or bash scripts/setup.sh {extra})") from e
