"""Every ```python block of README.md runs as written, in a fresh interpreter and an empty folder: its
imports, and the files it needs, are in the block itself or shipped with sdt."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str):
    """(line number, code) of each fenced block whose info string is 'python'."""
    blocks, lines, start, code = [], text.splitlines(), None, []
    for number, line in enumerate(lines, 1):
        if start is None and re.fullmatch(r"```\s*python\s*", line):
            start, code = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            start = None
        elif start is not None:
            code.append(line)
    assert start is None, f"README.md:{start}: a ```python block is never closed"
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_the_parser_finds_them():
    assert len(BLOCKS) >= 2
    assert python_blocks("a\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n") == [
        (2, "x = 1\n"), (8, "y = 2\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_python_block_runs_as_written(line: int, code: str, tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")  # a block that reaches for the network fails at once
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README.md:{line}: the block failed:\n{result.stderr[-3000:]}"
