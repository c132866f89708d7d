"""Turn the best weights of an ``sdt train`` run into a small file shipped with the package.

    python scripts/ship_weights.py runs/fmnist30-sdt_h_nano --out src/sdt/weights/sdt_h_nano_fmnist_e30.safetensors

Floating-point tensors are stored as float16 (half the size; the model loads them into float32),
with the run's model, recipe summary and test accuracy in the safetensors metadata, so the file
records how it was made. The shipped ``sdt_h_nano.fmnist_e30`` weights (the default FID extractor for
Fashion-MNIST) come from ``sdt train --recipe fashion-mnist`` (30 epochs), ``sdt_h_nano.fmnist`` from
the same recipe at 12 epochs (docs/generation.md).
"""
import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder of 'sdt train' (best.safetensors, summary.json, config.yaml)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args()
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    weights = load_file(str(run / "best.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    metadata = {"model": summary["model"], "test_top1": f"{summary['test']['top1']:.2f}",
                "best": json.dumps(summary["best"]), "config": (run / "config.yaml").read_text()}
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(half, str(tmp), metadata=metadata)
    tmp.replace(out)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, {summary['model']}, test top-1 {summary['test']['top1']:.2f}%")


if __name__ == "__main__":
    main()
