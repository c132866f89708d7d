"""Timing and peak-memory helpers shared by the benchmark scripts (CPU; CUDA when tensors are there).

Timings are ratios measured in one process: every case runs once per round, rounds interleave the
cases, and the median over rounds is reported, so that load from other processes hits all cases alike.

Peak memory on CPU is the growth of the process's peak resident set (VmHWM in /proc/self/status)
over the resident set before the call; the peak is reset before each measurement by writing 5 to
/proc/self/clear_refs (Linux), after malloc_trim has returned freed heap memory to the OS. It is
approximate (pages the allocator kept mapped can hide a little growth). On CUDA it is torch.cuda.max_memory_allocated over the baseline.
"""
import ctypes
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_gib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Extra peak memory (GiB) while running ``fn`` once, over what was resident before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    # hand freed heap memory back to the OS first, or new allocations reuse resident pages unseen
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) / 2 ** 20


def interleaved_medians(cases: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: str = "cpu") -> Dict[str, float]:
    """Median seconds per call of each case, rounds interleaved (see the module docstring)."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(warmup + rounds):
        for name, fn in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Callable[[], None]:
    """The benchmarks' training case: one optimizer step of cross-entropy on (images, labels), the model in
    train mode. ``forward``: what to call in place of ``model`` (e.g. its ``torch.compile``)."""
    forward = forward or model

    def step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """One line naming the machine and software the numbers come from."""
    import os
    import platform

    from sdt.engine import cpu_has_native_bf16

    bf16 = "native" if cpu_has_native_bf16() else "emulated"
    return (f"torch {torch.__version__}, {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}, bf16 {bf16}), "
            f"{os.cpu_count()} CPUs visible, {torch.get_num_threads()} threads, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def load_average() -> str:
    """The machine's load average (``os.getloadavg``): numbers taken above ~0.2 per CPU share the cores."""
    import os

    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"
