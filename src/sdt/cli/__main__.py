"""``python -m sdt.cli`` (torchrun and the experiments start commands this way)."""
import sys

from . import main

sys.exit(main())
