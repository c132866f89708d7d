"""The base of sdt's own error types (``ConfigError``, ``DataError``, ``CheckpointError``).

They mean bad input: a config, data or file that cannot work, with a message that names the
problem and the fix. The ``sdt`` command prints them as one line; any other exception is a bug
and keeps its traceback.
"""


class SdtError(Exception):
    """Bad input to sdt: the message names the problem and how to fix it."""
