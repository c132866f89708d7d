"""Build and load the fused CPU attention kernel, ``fused_cpu.cpp`` (the ``fused`` backend, ``fused.py``).

The kernel is compiled on first use with ``torch.utils.cpp_extension.load`` (20-60 s on 2 cores;
cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), with
``-march=native``: the build is for the machine it runs on. So the cache entry is named by the CPU
(``_build_name``): a home directory that moves to a CPU without the first one's instructions (an
AVX-512 build on an AVX2 machine) builds again instead of loading code that dies of SIGILL. ``SDT_FUSED=0`` disables it (the
backend falls back to the chunked Function); ``SDT_FUSED=1`` makes a failed build an error instead
of a warning.
"""
import contextlib
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)

# logits per task, in float32 elements: 2^17 (512 KiB, half this machine's 1 MiB L2). At the stage-1
# shape 2^16 and 2^18 were within 5% of it, 2^14 1.9x slower (docs/benchmarks.md).
TASK_ELEMENTS = 1 << 17
_ops = None
_failed: Optional[str] = None


def _setting() -> str:
    value = os.environ.get("SDT_FUSED", "auto").lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"SDT_FUSED={value!r}: expected 0 (off), 1 (required) or auto")
    return value


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and instruction-set flags (Linux), else what
    ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and aarch64 spellings
    found = [line for line in lines if line.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(found))) or f"{platform.machine()} {platform.processor()}"


def _build_name() -> str:
    """The extension's name, and so its cache directory: one per CPU the build was made for."""
    return "sdt_fused_cpu_" + hashlib.sha256(_cpu_identity().encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet_cuda_home() -> Iterator[None]:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, which torch.utils.cpp_extension
    logs when it is first imported on a machine with a CUDA toolkit and no GPU: this build is CPU-only."""
    logger = logging.getLogger("torch.utils.cpp_extension")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load():
    """The kernel's ops (``torch.ops.sdt_fused``), built on first use; None when disabled or the build failed."""
    global _ops, _failed
    setting = _setting()
    if setting == "0" or _failed is not None:
        return None
    if _ops is None:
        log.info("building sdt's fused CPU attention kernel (once per machine, under a minute)")
        try:
            with _quiet_cuda_home():
                from torch.utils import cpp_extension

                cpp_extension.load(
                    name=_build_name(),
                    sources=[str(Path(__file__).with_name("fused_cpu.cpp"))],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as error:  # no compiler, no headers, ...: fall back, once, loudly
            _failed = f"{type(error).__name__}: " + "\n".join(str(error).strip().splitlines()[-3:])
            if setting == "1":
                raise RuntimeError("SDT_FUSED=1 but the fused CPU kernel failed to build: " + _failed + " (install "
                                   "a C++ compiler, e.g. 'apt-get install g++', or unset SDT_FUSED)") from error
            warnings.warn("sdt: the fused CPU attention kernel failed to build, using the slower chunked loop "
                          "(set SDT_FUSED=0 to silence this): " + _failed)
            return None
        _ops = torch.ops.sdt_fused
    return _ops


@torch.compiler.assume_constant_result  # a constant for torch.compile: checked (and built) once, at trace time
def available() -> bool:
    """Whether the C++ kernel is built (building it on first use), see ``load``."""
    return load() is not None
