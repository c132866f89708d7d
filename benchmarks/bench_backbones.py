"""Backbones by wall time, as a user compares them: images/s, GFLOP/s and % of this machine's matmul peak.

Each model is ``timm.create_model(name)``: inference in ``eval()`` under ``torch.no_grad`` in float32 and under
``torch.autocast("cpu", torch.bfloat16)``, and one AdamW training step (cross-entropy, float32, ``train()``).
The same run times a 2048^3 matrix multiply in float32 and bfloat16: "% of peak" is the model's multiply-adds
x 2 x images/s over that rate (multiply-adds from ``sdt.models.complexity.count_flops``, per 224x224 image).

``--baseline SRC`` also times ``--baseline-models`` from another source tree (e.g. the code before a change)
in a second worker process whose PYTHONPATH is SRC, with its own ``TORCH_EXTENSIONS_DIR`` (the fused
kernel's cache, so that the two sources never rebuild over each other). Every case runs once per
round and the rounds interleave all cases of both workers, one at a time, so that the two trees see
the same machine; the tables report medians over the rounds.

    PYTHONPATH=src python benchmarks/bench_backbones.py                              # batch 16, 5 rounds
    PYTHONPATH=src python benchmarks/bench_backbones.py --baseline ../sdt-131cbfb/src --rounds 5   # after: git worktree add ../sdt-131cbfb 131cbfb
    PYTHONPATH=src python benchmarks/bench_backbones.py --models sdt_h_nano --size 64 --batch 2 --rounds 1  # smoke

``--keep-freed-memory`` runs the models (all of them, not the baseline worker) with freed memory kept for reuse,
as ``sdt train``/``eval`` run (``sdt.engine.keep_freed_memory``); ``--baseline src`` then times the same tree
without it, interleaved:

    PYTHONPATH=src python benchmarks/bench_backbones.py --keep-freed-memory --baseline src --baseline-models sdt_h_tiny deit_small_patch16_224
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

MODELS = ["sdt_h_tiny", "rmt_tiny", "deit_small_patch16_224", "convnext_tiny"]
MODES = ("fp32", "bf16", "train")
MATMUL_SIZE = 2048


def matmul_case(dtype) -> Callable[[], None]:
    import torch

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    return lambda: torch.mm(a, b)


def create(name: str, size: int):
    import timm

    return timm.create_model(name, **({"img_size": size} if name.startswith("deit") and size != 224 else {}))


def model_cases(name: str, batch: int, train_batch: int, size: int) -> Dict[str, Callable[[], None]]:
    import torch

    from _measure import train_step

    torch.manual_seed(0)
    model = create(name, size).eval()
    images = torch.randn(batch, 3, size, size)
    train_images = torch.randn(train_batch, 3, size, size)
    labels = torch.randint(0, model.num_classes, (train_batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def infer(bf16: bool) -> Callable[[], None]:
        def run():
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                model(images)
        return run

    return {f"{name} fp32": infer(False), f"{name} bf16": infer(True),
            f"{name} train": train_step(model, train_images, labels, optimizer)}


def worker(args: argparse.Namespace) -> None:
    """Set up the cases, then run one case per line of stdin and answer its seconds on stdout."""
    import torch

    import sdt  # noqa: F401  registers the models
    try:
        from sdt.models.complexity import count_flops
    except ImportError:  # a --baseline tree from before the package's layout (131cbfb): sdt/complexity.py
        from sdt.complexity import count_flops

    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from sdt.engine import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("--keep-freed-memory: nothing changed (not glibc, or MALLOC_*_ / GLIBC_TUNABLES are set)")
    cases: Dict[str, Callable[[], None]] = {}
    macs: Dict[str, int] = {}
    if args.matmul:
        cases["matmul fp32"] = matmul_case(torch.float32)
        cases["matmul bf16"] = matmul_case(torch.bfloat16)
    for name in args.models:
        cases.update(model_cases(name, args.batch, args.train_batch, args.size))
        macs[name] = count_flops(create(name, args.size), (3, args.size, args.size))
    print(json.dumps({"cases": list(cases), "macs": macs}), flush=True)
    for line in sys.stdin:
        label = line.strip()
        start = time.perf_counter()
        cases[label]()
        print(json.dumps(time.perf_counter() - start), flush=True)


class Worker:
    def __init__(self, tag: str, src: Path, ext_dir: Optional[str], models: List[str], args: argparse.Namespace,
                 matmul: bool, keep_freed_memory: bool = False):
        env = dict(os.environ, PYTHONPATH=str(src))
        if ext_dir:
            env["TORCH_EXTENSIONS_DIR"] = ext_dir
        command = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--batch", str(args.batch),
                   "--train-batch", str(args.train_batch), "--size", str(args.size), "--models", *models]
        if matmul:
            command.append("--matmul")
        if keep_freed_memory:
            command.append("--keep-freed-memory")
        self.tag = tag
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self.process.stdout.readline()
        if not hello:
            raise RuntimeError(f"the worker for {src} failed to start (its traceback is above)")
        hello = json.loads(hello)
        self.cases: List[str] = hello["cases"]
        self.macs: Dict[str, int] = hello["macs"]

    def run(self, label: str) -> float:
        self.process.stdin.write(label + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--baseline", type=Path, help="another source tree (its src/) to time --baseline-models from")
    parser.add_argument("--baseline-models", nargs="*", default=["sdt_h_tiny", "rmt_tiny"])
    parser.add_argument("--baseline-ext-dir", default="/tmp/torch_ext_base",
                        help="TORCH_EXTENSIONS_DIR of the baseline worker")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the models' worker keeps freed memory for reuse (sdt.engine.keep_freed_memory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _measure import environment, load_average, markdown_table

    torch.set_num_threads(args.threads)
    src = Path(os.environ.get("PYTHONPATH", "src").split(os.pathsep)[0]).resolve()
    workers = [Worker("", src, None, args.models, args, matmul=True, keep_freed_memory=args.keep_freed_memory)]
    if args.baseline:
        workers.append(Worker(" (baseline)", args.baseline.resolve(), args.baseline_ext_dir, args.baseline_models,
                              args, matmul=False))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}; {environment()}")
    print(f"sources: {src}" + (f"; baseline {args.baseline.resolve()}" if args.baseline else "")
          + ("; freed memory kept for reuse (not in the baseline worker)" if args.keep_freed_memory else ""))
    print(f"inference batch {args.batch}, training batch {args.train_batch}, {args.size}x{args.size}, "
          f"{args.rounds} rounds after 1 warm-up round (median)")
    print(load_average(), "(before)", flush=True)
    times: Dict[str, List[float]] = {}
    for round_index in range(1 + args.rounds):
        for w in workers:
            for label in w.cases:
                seconds = w.run(label)
                if round_index:
                    times.setdefault(label + w.tag, []).append(seconds)
        print(f"round {round_index} done", flush=True)
    for w in workers:
        w.close()
    median = {label: statistics.median(t) for label, t in times.items()}
    peak = {dtype: 2 * MATMUL_SIZE ** 3 / median[f"matmul {dtype}"] / 1e9 for dtype in ("fp32", "bf16")}
    print(load_average(), "(after)")
    print(f"\n{MATMUL_SIZE}^3 matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n")
    rows = []
    rate: Dict[str, Dict[str, float]] = {}
    for w in workers:
        for name, macs in w.macs.items():
            label = name + w.tag
            rate[label] = {mode: (args.batch if mode != "train" else args.train_batch) / median[f"{name} {mode}{w.tag}"]
                           for mode in MODES}
            row = [label, f"{macs / 1e9:.2f}"]
            for mode in MODES:
                gflops = 2 * macs * rate[label][mode] / 1e9
                row += [f"{rate[label][mode]:.2f}", f"{gflops:.0f}"]
                if mode != "train":
                    row.append(f"{100 * gflops / peak[mode]:.0f}%")
            rows.append(row)
    print(markdown_table(["model", "GMACs", "fp32 img/s", "GFLOP/s", "% of fp32 peak", "bf16 img/s", "GFLOP/s",
                          "% of bf16 peak", "train fp32 img/s", "GFLOP/s (fwd)"], rows))
    ratios = [("sdt_h_tiny", other) for other in ("deit_small_patch16_224", "rmt_tiny", "convnext_tiny")]
    ratios += [(name, name + " (baseline)") for name in args.baseline_models]
    lines = []
    for a, b in ratios:
        if a in rate and b in rate:
            lines.append(f"{a} / {b}: " + ", ".join(f"{mode} {rate[a][mode] / rate[b][mode]:.2f}x" for mode in MODES))
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
