"""Process set-up: ``keep_freed_memory`` (the tensors' freed memory reused instead of page-faulted back in)."""
import os
import platform
import subprocess
import sys

import pytest

# 48 MiB tensors, freed at once: above glibc's largest default mmap threshold (32 MiB), as sdt_h_tiny's
# stage-1 activations at batch 16 are, so that by default each one is a fresh mapping that page-faults in.
SCRIPT = """
import resource, sys, torch
from sdt.engine import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(12 << 20)
before = faults()
for _ in range(10):
    torch.ones(12 << 20)
print(int(changed), (faults() - before) / 10)
"""

glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc settings; other allocators reuse freed memory already")


def _run(mode: str, **env: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), float(out[1])


@glibc_only
def test_keep_freed_memory_stops_the_page_faults_of_reallocated_tensors():
    changed, faults_kept = _run("keep")
    assert changed
    _, faults_default = _run("default")
    assert faults_default > 10_000  # 48 MiB is 12,288 pages, each faulted in again
    assert faults_kept < 100


@glibc_only
def test_keep_freed_memory_leaves_the_users_own_malloc_settings_alone():
    changed, faults = _run("keep", MALLOC_TRIM_THRESHOLD_="1000000")
    assert not changed and faults > 10_000
