"""Decide whether scripts/setup.sh installs its pinned PyTorch: print one line, "keep VERSION" or "install WHY".

    python scripts/check_torch.py                    # the torch of this Python (read without importing it)
    python scripts/check_torch.py --installed 2.3.1  # a given version; --installed none: torch is missing

"keep" when the installed torch meets the lower bound that pyproject.toml states (``"torch>=X"`` in
``[project] dependencies``): a user's CUDA, ROCm, conda or CPU build of PyTorch stays as it is. "install"
when torch is missing or older. Only the release numbers count: 2.14.1+cu128 and 2.14.1 are 2.14.1, and a
pre-release such as 2.15.0a0+git1234 (NVIDIA's containers) counts as 2.15.0. Standard library only: this
runs before anything is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Tuple

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def release(version: str) -> Tuple[int, ...]:
    """(2, 14, 1) for "2.14.1+cu128", "2.14.1" or "v2.14.1"; ValueError for a string with no release number."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    if not match:
        raise ValueError(f"not a version: {version!r}")
    parts = tuple(int(p) for p in match.group(1).split("."))
    while len(parts) > 1 and parts[-1] == 0:  # 2.14 == 2.14.0
        parts = parts[:-1]
    return parts


def minimum_torch(pyproject: Path = PYPROJECT) -> str:
    """The X of ``"torch>=X"`` in pyproject.toml's dependencies."""
    text = pyproject.read_text(encoding="utf-8")
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.M | re.S)
    match = re.search(r"""["']torch\s*>=\s*([0-9][0-9.]*)""", deps.group(1) if deps else "")
    if not match:
        raise ValueError(f"{pyproject} states no 'torch>=X' in [project] dependencies")
    return match.group(1)


def installed_torch() -> Optional[str]:
    """The version of the torch distribution this Python would import, or None."""
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def decide(installed: Optional[str], minimum: str) -> str:
    if installed is None:
        return "install torch is missing"
    if release(installed) < release(minimum):
        return f"install torch {installed} is older than {minimum}, the oldest sdt supports"
    return f"keep {installed}"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--installed", help="the torch version to judge ('none': missing); default: this Python's")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    if args.installed is None:
        installed = installed_torch()
    else:
        installed = None if args.installed.lower() == "none" else args.installed
    try:
        print(decide(installed, minimum_torch(args.pyproject)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
