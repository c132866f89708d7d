"""The ``sdt`` command: a thin layer over the library.

    sdt models            the model table (parameters, GFLOPs, the papers' numbers)
    sdt export            ONNX (checked with onnxruntime) or TorchScript
    sdt viz               decay / gate / attention maps for a query location
    sdt convert           RMT checkpoint -> rmt_* / sdt_h_* safetensors

Each subcommand is one ``add_*_parser`` function (its arguments) and one ``run_*`` function.
"""
import argparse
import os
import sys
from typing import List, Optional


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="print the model table (parameters, GFLOPs, papers' numbers)",
                              description="Print every registered SDT/RMT model with its parameters and "
                                          "GMACs, beside the numbers the papers report.")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"),
                   help="input size for the FLOP count (default: 3 224 224)")
    p.add_argument("names", nargs="*", help="models to list (default: all)")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from .complexity import model_table

    print(model_table(args.names or None, tuple(args.input_size)))
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX (checked with onnxruntime) or TorchScript",
                              description="Export a registered model, optionally with local weights, to ONNX "
                                          "(dynamic batch/height/width, opset 17) or TorchScript.")
    p.add_argument("model", help="registered model name, e.g. sdt_h_tiny")
    p.add_argument("--weights", default="", help="local .safetensors/.pth weights (ours or RMT's released ones)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example input height and width (default: the model's pretrained_cfg)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("-o", "--output", required=True, help="file to write (written atomically)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .export import check_onnx, create_model_from_weights, export_onnx, script_model

    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    model = create_model_from_weights(args.model, args.weights, **kwargs).eval()
    chans = model.in_chans
    height, width = args.input_size or model.pretrained_cfg["input_size"][1:]
    if args.format == "torchscript":
        tmp = args.output + ".tmp"
        script_model(model).save(tmp)
        os.replace(tmp, args.output)
        print(f"wrote {args.output} (TorchScript)")
        return 0
    path = export_onnx(model, args.output, (chans, height, width))
    print(f"wrote {path} (ONNX opset 17, dynamic batch/height/width)")
    if not args.no_check:
        shapes = [(2, chans, height, width), (1, chans, height + height // 2 + 3, width + 5)]
        for r in check_onnx(model, path, shapes):
            print(f"onnxruntime vs PyTorch at {r['shape']}: max |diff| {r['max_abs_diff']:.2e} "
                  f"(max |output| {r['max_abs_output']:.2e})")
    return 0


def add_viz_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("viz", help="decay, gate and attention maps for a query location, as PNGs",
                              description="Draw, per stage and head, the gate map G, RMT's fixed decay, the "
                                          "model's decay and the attention with and without it, for one query.")
    p.add_argument("--model", default="sdt_h_tiny", help="registered model name (default: sdt_h_tiny)")
    p.add_argument("--weights", default="", help="local .safetensors/.pth weights (default: random init, with a warning)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--image", default="astronaut",
                   help="an image path, or a scikit-image sample: astronaut, chelsea, coffee (default: astronaut)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize the image to this (default: the model's input size)")
    p.add_argument("--query", default=None, help="query location 'x,y' in resized-image pixels (default: centre)")
    p.add_argument("--block", type=int, default=-1, help="block within each stage (default: last)")
    p.add_argument("-o", "--out-dir", default="viz", help="folder for the PNGs (default: viz)")
    p.set_defaults(func=run_viz)


def run_viz(args: argparse.Namespace) -> int:
    from .export import create_model_from_weights
    from .viz import attention_maps, load_image, plot_attention_maps, warn_if_untrained

    warn_if_untrained(args.weights)
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    model = create_model_from_weights(args.model, args.weights, **kwargs).eval()
    cfg = model.pretrained_cfg
    size = tuple(args.size or cfg["input_size"][1:])
    mean, std = cfg["mean"], cfg["std"]
    if model.in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * model.in_chans, (sum(std) / len(std),) * model.in_chans
    image, display = load_image(args.image, size, model.in_chans, mean, std)
    if args.query:
        try:
            query = tuple(float(v) for v in args.query.split(","))
            assert len(query) == 2
        except (ValueError, AssertionError):
            raise SystemExit(f"--query must be 'x,y' in pixels, got {args.query!r}")
    else:
        query = (size[1] / 2, size[0] / 2)
    maps = attention_maps(model, image, query, args.block)
    for path in plot_attention_maps(maps, display, query, args.out_dir, title=args.model):
        print(f"wrote {path}")
    return 0


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert an RMT checkpoint (RMT's released code) into rmt_* or sdt_h_*",
                              description="Load a checkpoint saved by RMT's released code into one of our models and "
                                          "save it as safetensors. Into sdt_h_* models the gate starts exactly at "
                                          "RMT's decay (W_g = 0, b = logit(gamma)).")
    p.add_argument("checkpoint", help="RMT checkpoint (.pth with a 'model' entry, or .safetensors)")
    p.add_argument("--model", required=True, help="target model, e.g. rmt_tiny or sdt_h_tiny")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head (default 1000)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (written atomically)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    import timm

    from .export import convert_rmt_checkpoint

    kwargs = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    model = timm.create_model(args.model, **kwargs)
    counts = convert_rmt_checkpoint(args.checkpoint, model, args.output)
    print(f"wrote {args.output}: {counts['tensors']} tensors, {counts['gate_tensors']} gate tensors at RMT's decay")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdt", description="Spatial Decay Transformers: models, training, evaluation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_models_parser(subparsers)
    add_export_parser(subparsers)
    add_viz_parser(subparsers)
    add_convert_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
