"""bf16 autocast on the CPU: inference images/s against float32, and top-1 agreement of the shipped weights.

For each model, float32 inference and inference under ``torch.autocast("cpu", torch.bfloat16)``
run in interleaved rounds (median per case, ``_measure.interleaved_medians``), so that load from
other processes hits both alike; ``x fp32`` is the ratio of images/s in the same run, checked against
issue 16's target for sdt_h_tiny (2.2x). The load average is printed before and after: quote the
numbers only from an idle machine. Then the
shipped Fashion-MNIST classifier (``sdt_h_nano.fmnist``) classifies the test set in float32 and
under bf16 autocast, and the script prints how often the two top-1 predictions agree.

``--layers`` adds what the GEMM layers alone gain: every ``nn.Linear`` and ``nn.Conv2d`` of each model
runs on the input it gets in one float32 forward pass (captured by hooks), in float32 and under bf16
autocast, interleaved; the table sums them per layer type, with their share of the model's float32
time. A model cannot gain more from bf16 than its layers do, unless the rest of its time gains more.

    PYTHONPATH=src python benchmarks/bench_bf16.py                          # batch 8, 224x224, 5 rounds
    PYTHONPATH=src python benchmarks/bench_bf16.py --batch 1 --size 64 --rounds 1 --images 200   # smoke test
    PYTHONPATH=src python benchmarks/bench_bf16.py --layers --images 0      # + the Linear/Conv2d layers alone
"""
import argparse
from typing import Callable, Dict, List, Tuple

import timm
import torch

import sdt  # noqa: F401  registers the models
from _measure import environment, interleaved_medians, load_average, markdown_table

MODELS = ["sdt_h_tiny", "rmt_tiny", "deit_small_patch16_224"]
# issue 16's targets: sdt_h_tiny under bf16 autocast at least 2.2x its float32 inference, and top-1 agreement of
# the shipped weights at least 99%
TARGET_SPEEDUP = 2.2
TARGET_AGREEMENT = 0.99


def inference(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def run():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(images)

    return run


def create(name: str, size: int) -> torch.nn.Module:
    return timm.create_model(name, **({"img_size": size} if name.startswith("deit") else {})).eval()


def throughput(names: List[str], batch: int, size: int, rounds: int) -> Tuple[str, Dict[str, float]]:
    """The table, and each model's float32 seconds per call."""
    cases: Dict[str, Callable[[], None]] = {}
    for name in names:
        model = create(name, size)
        images = torch.randn(batch, 3, size, size)
        cases[f"{name} fp32"] = inference(model, images, bf16=False)
        cases[f"{name} bf16"] = inference(model, images, bf16=True)
    seconds = interleaved_medians(cases, rounds)
    rows = []
    for name in names:
        fp32, bf16 = seconds[f"{name} fp32"], seconds[f"{name} bf16"]
        rows.append([name, f"{batch / fp32:.1f}", f"{batch / bf16:.1f}", f"{fp32 / bf16:.2f}"])
    table = markdown_table(["model", "fp32 img/s", "bf16 autocast img/s", "x fp32"], rows)
    if "sdt_h_tiny" in names:
        speedup = seconds["sdt_h_tiny fp32"] / seconds["sdt_h_tiny bf16"]
        table += (f"\n\nsdt_h_tiny bf16 autocast {speedup:.2f}x fp32 (target >= {TARGET_SPEEDUP}x: "
                  f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    return table, {name: seconds[f"{name} fp32"] for name in names}


def layer_inputs(model: torch.nn.Module, images: torch.Tensor) -> List[tuple]:
    """(type name, layer, its input) for every Linear and Conv2d, from one float32 inference call."""
    captured: List[tuple] = []
    hooks = [module.register_forward_pre_hook(lambda m, args: captured.append((type(m).__name__, m, args[0].clone())))
             for module in model.modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.inference_mode():
        model(images)
    for hook in hooks:
        hook.remove()
    return captured


def run_layers(captured: List[tuple], kind: str, bf16: bool) -> Callable[[], None]:
    calls = [inference(layer, x, bf16) for layer_kind, layer, x in captured if layer_kind == kind]
    return lambda: [call() for call in calls]


def layers(names: List[str], batch: int, size: int, rounds: int, model_seconds: Dict[str, float]) -> str:
    rows = []
    for name in names:
        captured = layer_inputs(create(name, size), torch.randn(batch, 3, size, size))
        kinds = sorted({kind for kind, _, _ in captured})
        cases = {f"{kind} {dtype}": run_layers(captured, kind, dtype == "bf16") for kind in kinds
                 for dtype in ("fp32", "bf16")}
        seconds = interleaved_medians(cases, rounds)
        for kind in kinds:
            fp32, bf16 = seconds[f"{kind} fp32"], seconds[f"{kind} bf16"]
            count = sum(layer_kind == kind for layer_kind, _, _ in captured)
            share = f"{100 * fp32 / model_seconds[name]:.0f}%"
            rows.append([name, f"{kind} x {count}", f"{1e3 * fp32:.1f}", f"{1e3 * bf16:.1f}", f"{fp32 / bf16:.2f}", share])
    return markdown_table(["model", "layers", "fp32 ms", "bf16 autocast ms", "x fp32", "share of model fp32 time"], rows)


def agreement(images_count: int, batch: int = 500) -> str:
    """Top-1 agreement of the shipped sdt_h_nano.fmnist between float32 and bf16 autocast on the test set."""
    from sdt.data import fashion_mnist_tensors
    from sdt.tools.fid import in_domain_extractor

    classifier = in_domain_extractor()
    images, labels = fashion_mnist_tensors("test")
    images, labels = images[:images_count], labels[:images_count]
    predictions = {False: [], True: []}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            for bf16 in (False, True):
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    predictions[bf16].append(classifier.logits(chunk).argmax(-1))
    fp32, bf16 = torch.cat(predictions[False]), torch.cat(predictions[True])
    agree = (fp32 == bf16).float().mean().item()
    return (f"sdt_h_nano.fmnist on {len(images)} Fashion-MNIST test images: top-1 agreement fp32 vs bf16 autocast "
            f"{100 * agree:.2f}% ({int((fp32 != bf16).sum())} differ; target >= {100 * TARGET_AGREEMENT:.0f}%: "
            f"{'met' if agree >= TARGET_AGREEMENT else 'NOT met'}); accuracy fp32 "
            f"{100 * (fp32 == labels).float().mean().item():.2f}%, bf16 {100 * (bf16 == labels).float().mean().item():.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=10000, help="Fashion-MNIST test images for the agreement "
                                                                    "check (0: skip it)")
    parser.add_argument("--layers", action="store_true", help="also time the models' Linear and Conv2d layers alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment())
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.rounds} rounds (median)\n")
    if args.models:
        print(load_average(), "(before)", flush=True)
        table, model_seconds = throughput(args.models, args.batch, args.size, args.rounds)
        print(table)
        if args.layers:
            print("\n" + layers(args.models, args.batch, args.size, args.rounds, model_seconds))
        print(load_average(), "(after)")
    if args.images:
        print("\n" + agreement(args.images))


if __name__ == "__main__":
    main()
