"""The ``sdt`` command: a thin layer over the library.

    sdt train             train a classifier from a recipe (``sdt train --help`` lists them)
    sdt eval              evaluate a checkpoint (or a hub folder): top-1/top-5, per-class accuracy, confusion matrix
    sdt predict           the top-k classes of image files, from a run, hub folder, weights file or shipped tag
    sdt export-hub        a finished training run in timm's hub layout (config.json, model.safetensors, README.md)
    sdt models            the model table (parameters, GFLOPs, the papers' numbers)
    sdt viz               decay / gate / attention maps for a query location
    sdt convert           RMT checkpoint -> rmt_* / sdt_h_* safetensors
    sdt export            ONNX (checked with onnxruntime) or TorchScript
    sdt gen-train         train a class-conditional DiT (decay variants of sdt.decay: none / fixed / cag ...) on Fashion-MNIST
    sdt sample            class-conditional samples from a generation run: PNG grid + .npz of uint8 images
    sdt fid               FID (in-domain extractor by default, or Inception from a local file) + conditional accuracy
    sdt detect            train a detector (SDT-H / RMT / ResNet backbone + FPN) on Fashion-MNIST mosaics, box mAP
    sdt segment           train a Semantic-FPN segmenter on Fashion-MNIST mosaics, mIoU

Each subcommand is one ``add_*_parser`` function (its arguments) and one ``run_*`` function that calls
one function of the layers below; the four training commands share ``run_task`` (``cli/common.py``, with
the flags every command shares).
"""
import argparse
import sys
from typing import List, Optional

from ..data import DATASETS
from ..decay import DECAY_ALIASES, DECAY_VARIANTS
from ..engine.config import recipes_for
from ..models.registry import check_model_name
from ..tasks import GenConfig, TrainConfig
from ..tasks.diffusion import OBJECTIVES, SAMPLERS
from ..tools.fid import DEFAULT_EXTRACTOR
from .common import (add_deprecated_flag, add_input_size_arguments, add_output_argument, add_override_arguments,
                     add_run_arguments, input_size)


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="print the model table (parameters, GFLOPs, papers' numbers)",
                              description="Print every registered SDT/RMT model with its parameters and "
                                          "GMACs, beside the numbers the papers report.")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"),
                   help="input size for the FLOP count (default: 3 224 224)")
    p.add_argument("names", nargs="*", help="models to list (default: all)")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from ..tools.table import model_table

    for name in args.names:
        check_model_name(name)
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
    add_input_size_arguments(p, "example input size")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    add_output_argument(p, required=True, help="file to write (written atomically)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..tools.export import export_command

    chans, size = input_size(args, "export", "H W")
    if chans is not None and args.in_chans is not None and chans != args.in_chans:
        raise SystemExit(f"sdt export: error: --input-size says {chans} channels and --in-chans {args.in_chans}; give one")
    args.in_chans = args.in_chans or chans
    for line in export_command(args.model, args.weights, args.output, args.format, args.num_classes, args.in_chans,
                               size, check=not args.no_check):
        print(line)
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
                   help="an image path, a scikit-image sample (astronaut, chelsea, coffee) or a Fashion-MNIST "
                        "test image fmnist:<index> (default: astronaut)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize the image to this (default: the model's input size)")
    p.add_argument("--query", default=None, help="query location 'x,y' in resized-image pixels (default: centre)")
    p.add_argument("--block", type=_block_arg, default=-1,
                   help="block within each stage, or within the stack of an sdt_vit_* model; 'all' draws every "
                        "block (default: -1, the last)")
    add_output_argument(p, "--out-dir", default="viz", help="folder for the PNGs (default: viz)")
    p.set_defaults(func=run_viz)


def _block_arg(text: str) -> Optional[int]:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a block index (e.g. -1, 0, 3) or 'all', got {text!r}") from None


def run_viz(args: argparse.Namespace) -> int:
    from ..tools.viz import viz_command

    for path in viz_command(args.model, args.weights, args.image, args.size, args.query, args.block, args.output,
                            args.num_classes, args.in_chans):
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
    add_output_argument(p, required=True, help="output .safetensors (written atomically)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    import timm

    from ..tools.export import convert_rmt_checkpoint

    check_model_name(args.model)
    kwargs = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    model = timm.create_model(args.model, **kwargs)
    counts = convert_rmt_checkpoint(args.checkpoint, model, args.output)
    print(f"wrote {args.output}: {counts['tensors']} tensors, {counts['gate_tensors']} gate tensors at RMT's decay")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier from a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an image classifier. A recipe (YAML) sets every option; -o section.key=value "
                    "changes one. The run folder gets config.yaml (fully resolved), checkpoints, metrics.jsonl, "
                    "TensorBoard logs, curves.png and report.md.",
        epilog="examples:\n"
               "  sdt train --recipe quick                                   # Fashion-MNIST, a few minutes on a CPU\n"
               "  sdt train --recipe fashion-mnist --model rmt_nano --output runs/rmt\n"
               "  sdt train --recipe quick --initial-checkpoint sdt_h_nano.fmnist_e30 --data-dir /data/mnist   # fine-tune\n"
               "  sdt train --recipe imagenet --data-dir /data/imagenet -o engine.amp=bf16\n"
               "  sdt train --output runs/rmt --resume                       # continue after a crash\n"
               "  torchrun --nproc-per-node 4 -m sdt.cli train --recipe imagenet --data-dir /data/imagenet")
    add_run_arguments(p, f"recipe name ({', '.join(recipes_for(TrainConfig))}) or path to a YAML file",
                      "runs/<model>-<date>-<time>")
    p.add_argument("--model", help="model name (= -o model.name=...)")
    p.add_argument("--data-dir", help="dataset folder (= -o data.data_dir=...)")
    p.add_argument("--initial-checkpoint", metavar="WEIGHTS",
                   help="fine-tune from these weights: a weights file (ours, or RMT's released .pth), a run or hub "
                        "folder, or a shipped tag such as sdt_h_nano.fmnist_e30; a head with other classes is reset, "
                        "a stem with other channels adapted (= -o model.initial_checkpoint=...)")
    add_override_arguments(p, "-o engine.lr=1e-3 -o aug.mixup=0", "Classify",
                           {"model": "model.name", "data_dir": "data.data_dir",
                            "initial_checkpoint": "model.initial_checkpoint"})


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (top-1/top-5, per-class accuracy, confusion matrix, throughput)",
        description="Evaluate a checkpoint: a run folder (its best weights), a checkpoint folder or a .safetensors "
                    "file. Model and data come from the run's config.yaml unless given. Writes eval.json and "
                    "confusion.png to --output (default: <run>/eval-<split>-<size>px).")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    add_input_size_arguments(p, "test-time input size")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the run's, or the model's pretrained cfg)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model", help="model name (needed for a weights file outside a run folder)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the run's dataset (for a hub folder: fashion-mnist)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    p.add_argument("--ema", action="store_true", help="for a checkpoint folder: evaluate its EMA weights")
    p.add_argument("--output", help="where eval.json and confusion.png go")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..tools.eval import evaluate_checkpoint, format_eval

    chans, size = input_size(args, "eval", "N")
    if size is not None and size[0] != size[1]:
        raise SystemExit(f"sdt eval: error: evaluation runs at a square size (resize, then centre crop), got "
                         f"{size[0]}x{size[1]}; use --input-size C N N or --img-size N")
    result = evaluate_checkpoint(args.checkpoint, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                                 split=args.split, input_size=size and size[0], batch_size=args.batch_size,
                                 output_dir=args.output, use_ema=args.ema, crop_pct=args.crop_pct, in_chans=chans)
    print(format_eval(result))
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="the top-k classes of image files (a run, hub folder, weights file or shipped tag)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the top-k classes of each image with their probabilities, preprocessed as the model "
                    "expects (input size, channels, mean/std, crop: the run's config or the pretrained cfg). "
                    "An unreadable image is reported on stderr and the others are still predicted; the exit "
                    "status is then 1 (0: every image predicted, 2: bad arguments or model).",
        epilog="examples:\n"
               "  sdt predict shirt.png --model sdt_h_nano.fmnist_e30          # weights shipped with sdt\n"
               "  sdt predict a.jpg b.jpg --model runs/flowers --topk 3 --json\n"
               "  sdt predict a.jpg --model hub/sdt_h_nano-fmnist\n"
               "  sdt predict a.jpg --model best.safetensors --arch sdt_h_nano")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", required=True,
                   help="a run folder, a hub folder (sdt export-hub), a shipped tag (sdt_h_nano.fmnist_e30) or a "
                        "weights file (with --arch)")
    p.add_argument("--arch", help="the model name of a weights file, e.g. sdt_h_nano (its head and channels are read "
                                  "from the file)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list (one object per image) instead of text")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..tools.predict import predict_command

    return predict_command(args.images, args.model, args.arch, args.topk, args.json)


def add_export_hub_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-hub", help="write a finished training run in timm's hub layout (push_to_hf_hub / local-dir:)",
        description="Write the best weights of a finished 'sdt train' run in timm's Hugging Face hub layout: "
                    "model.safetensors, config.json (architecture, classes, label names, input size, mean/std, "
                    "crop) and a README model card with the run's measured metrics. "
                    "timm.create_model('local-dir:OUT', pretrained=True) and 'sdt eval OUT' load it.")
    p.add_argument("run", help="run folder of a finished 'sdt train'")
    add_output_argument(p, help="folder to write (new or empty, unless --overwrite)")
    p.add_argument("old_output", nargs="?", help=argparse.SUPPRESS)  # the output as a second positional (deprecated)
    p.add_argument("--overwrite", action="store_true", help="replace the output folder (the old one goes once the new one is complete)")
    p.add_argument("--label-names", default=None, metavar="A,B,...",
                   help="comma-separated class names in label order (default: the run's dataset's)")
    p.set_defaults(func=run_export_hub)


def run_export_hub(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tools.hub import export_run_to_hub

    if args.old_output is not None:
        if args.output is not None:
            raise ConfigError(f"two outputs: --output {args.output} and {args.old_output}; give --output alone")
        print("sdt export-hub: note: the output as a second positional is deprecated; use --output", file=sys.stderr)
        args.output = args.old_output
    if args.output is None:
        raise ConfigError("give the folder to write with --output FOLDER")
    names = None if args.label_names is None else [n.strip() for n in args.label_names.split(",")]
    out = export_run_to_hub(args.run, args.output, overwrite=args.overwrite, label_names=names)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))} "
          f"(load with timm.create_model('local-dir:{out}', pretrained=True) after `import sdt`, or sdt eval {out})")
    return 0


def add_gen_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gen-train", help=f"train a class-conditional DiT (attention decay: {' / '.join(DECAY_VARIANTS)})",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a class-conditional diffusion transformer (sdt.models.dit) with DDPM or flow matching, "
                    "on the engine of 'sdt train' (same checkpoints, exact resume, progress bars, torchrun). "
                    "The run folder gets config.yaml, checkpoints (model + EMA), metrics.jsonl, TensorBoard logs, "
                    "curves.png, samples.png (a row per class, EMA weights) and report.md.",
        epilog="examples:\n"
               "  sdt gen-train --output runs/gen-cag                           # recipe gen-fashion-mnist, decay cag\n"
               "  sdt gen-train --output runs/gen-fixed --decay fixed\n"
               "  sdt gen-train --output runs/gen-ddpm --objective ddpm -o model.learn_sigma=true\n"
               "  sdt gen-train --output runs/gen-cag --resume                  # continue after a crash\n"
               "  torchrun --nproc-per-node 8 -m sdt.cli gen-train --model dit_s_2 --dataset folder --data-dir /data/x")
    add_run_arguments(p, f"recipe name ({', '.join(recipes_for(GenConfig))}) or YAML file (default gen-fashion-mnist)",
                      "runs/<model>-<decay>-<date>-<time>")
    p.add_argument("--model", help="DiT config, e.g. dit_n_4, dit_s_2 (= -o model.name=...)")
    p.add_argument("--decay", choices=(*DECAY_VARIANTS, *DECAY_ALIASES),
                   help="the attention's decay variant, sdt.decay.DECAY_VARIANTS (= -o model.decay=...)")
    p.add_argument("--attn", choices=(*DECAY_VARIANTS, *DECAY_ALIASES), help="the former name of --decay (deprecated)")
    p.add_argument("--objective", choices=OBJECTIVES, help="ddpm: DiT's epsilon DDPM; flow: SiT's flow matching")
    p.add_argument("--dataset", choices=DATASETS, help="= -o data.dataset=...")
    p.add_argument("--data-dir", help="dataset folder (= -o data.data_dir=...)")
    add_override_arguments(p, "-o engine.lr=1e-4 -o model.kwargs.depth=6", "Generate",
                           {"model": "model.name", "decay": "model.decay", "objective": "model.objective",
                            "dataset": "data.dataset", "data_dir": "data.data_dir"}, default_recipe="gen-fashion-mnist")


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="class-conditional samples from a generation run (PNG grid + .npz)",
                              description="Sample every class from a 'sdt gen-train' run (EMA weights of its newest "
                                          "checkpoint by default). Writes <out>.npz (arr_0: uint8 (N, H, W, C), labels) "
                                          "and <out>.png (a row per class). Sampler, steps and guidance default to the "
                                          "run's config (section sample).")
    p.add_argument("run", help="run folder of 'sdt gen-train'")
    add_output_argument(p, "--out", help="output prefix, required (writes <output>.npz and <output>.png)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class")
    p.add_argument("--classes", default=None, metavar="C0,C1,...",
                   help="comma-separated class indices to sample (default: every class); -1: unconditional "
                        "(needs a model trained with label dropout)")
    p.add_argument("--sampler", default=None, help=", ".join(f"{' | '.join(names)} ({objective} objective)"
                                                              for objective, names in SAMPLERS.items()))
    p.add_argument("--steps", type=int, default=None, help="sampling steps (DDPM: respaced)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-from", default="ema", choices=("ema", "model", "best"),
                   help="which weights of the run: its newest checkpoint's EMA or model weights, or best.safetensors "
                        "(default: ema)")
    add_deprecated_flag(p, "--weights", "weights_from", "--weights-from", choices=("ema", "model", "best"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: the GPU when there is one")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice, every core)")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tools.sample import sample_command

    if args.output is None:  # not argparse's required=: the deprecated --out fills it too
        raise ConfigError("the following argument is required: --output PREFIX (writes PREFIX.npz and PREFIX.png)")
    print(sample_command(args.run, args.output, args.per_class, args.classes, args.sampler, args.steps, args.cfg_scale,
                         args.seed, args.weights_from, args.batch_size, args.threads, args.device))
    return 0


def add_fid_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fid", help="FID of an .npz of samples against Fashion-MNIST, + conditional accuracy",
                              description="FID between the uint8 samples of an .npz ('sdt sample') and a Fashion-MNIST "
                                          "split, with the shipped in-domain extractor (default) or Inception from a "
                                          "local weights file. With labels in the .npz, also the in-domain classifier's "
                                          "accuracy on the samples.")
    p.add_argument("samples", help=".npz with arr_0 uint8 (N, H, W, C) [and labels]")
    p.add_argument("--reference", default="test", choices=("test", "train"), help="Fashion-MNIST split (default test, 10k)")
    p.add_argument("--num-reference", type=int, default=0, help="use the first N reference images (default: all)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--extractor", default=None,
                   help=f"timm model[.tag] with local weights giving pre-logit features (default: {DEFAULT_EXTRACTOR}; "
                        "with --extractor-checkpoint: the model of its run)")
    p.add_argument("--extractor-checkpoint", default=None,
                   help="a classifier from 'sdt train': its run folder, a checkpoint folder or a weights file in it "
                        "(a weights file elsewhere needs --extractor)")
    p.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity Inception-v3 FID weights file (weights-inception-2015-12-05-6726825d.pth): "
                        "use Inception features")
    p.add_argument("--no-accuracy", action="store_true", help="skip the conditional accuracy even if the .npz has labels")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice, every core)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: the GPU when there is one")
    p.set_defaults(func=run_fid)


def run_fid(args: argparse.Namespace) -> int:
    from ..tools.fid import fid_command

    for line in fid_command(args.samples, args.reference, args.num_reference, args.data_dir, args.extractor,
                            args.extractor_checkpoint, args.inception_weights, not args.no_accuracy, args.threads,
                            args.device):
        print(line)
    return 0


def add_dense_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``sdt detect`` and ``sdt segment`` (sdt.tasks.detect / sdt.tasks.segment): a run from a recipe, -o overrides, --output, --resume."""
    for name, recipe, help_text in (
            ("detect", "detect-mosaic", "train a detector (Faster/Mask R-CNN, RetinaNet, FCOS) on Fashion-MNIST mosaics"),
            ("segment", "segment-mosaic", "train a Semantic-FPN segmenter on Fashion-MNIST mosaics")):
        p = subparsers.add_parser(
            name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{help_text[0].upper() + help_text[1:]} (a mosaic benchmark, not COCO; docs/dense.md). "
                        "The run folder gets config.yaml, checkpoints, metrics.jsonl, TensorBoard logs, curves.png, "
                        "samples.png, summary.json and report.md.",
            epilog="examples:\n"
                   f"  sdt {name}                                     # recipe {recipe}, sdt_h_nano\n"
                   f"  sdt {name} --backbone rmt_nano --output runs/{name}-rmt\n"
                   + ("  sdt detect --detector maskrcnn -o engine.epochs=4\n" if name == "detect" else "")
                   + f"  sdt {name} --output runs/{name}-rmt --resume        # continue after a crash")
        add_run_arguments(p, f"recipe name (default {recipe}) or path to a YAML file", f"runs/{name}-<backbone>-<date>-<time>")
        p.add_argument("--backbone", help="= -o model.backbone=... (sdt_h_nano, rmt_nano, sdt_h_nano_full2d, tv_resnet18, ...)")
        if name == "detect":
            p.add_argument("--detector", choices=("fasterrcnn", "maskrcnn", "retinanet", "fcos"), help="= -o model.detector=...")
        p.add_argument("--initial-checkpoint", metavar="WEIGHTS",
                       help="classification weights for the backbone: a run or hub folder, a .safetensors / RMT .pth "
                            "or a shipped tag like sdt_h_nano.fmnist_e30 (= -o model.initial_checkpoint=...)")
        flags = {"backbone": "model.backbone", "initial_checkpoint": "model.initial_checkpoint",
                 **({"detector": "model.detector"} if name == "detect" else {})}
        add_override_arguments(p, "-o data.canvas=192 -o model.frozen_stages=1", name.capitalize(), flags, default_recipe=recipe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdt", description="Spatial Decay Transformers: models, training, evaluation.")
    debug_help = "on an error, show the full traceback (by default bad input is reported in one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # the package's own __version__: the package is imported before any of its modules, and an import of it
    # here would be an upward import (tests/test_layout.py)
    version = sys.modules[__name__.partition(".")[0]].__version__  # "sdt", also under python -m sdt.cli
    parser.add_argument("--version", action="version", version=f"sdt {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_predict_parser(subparsers)
    add_models_parser(subparsers)
    add_viz_parser(subparsers)
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    add_export_hub_parser(subparsers)
    add_gen_train_parser(subparsers)
    add_sample_parser(subparsers)
    add_fid_parser(subparsers)
    add_dense_parsers(subparsers)
    for subparser in subparsers.choices.values():  # `sdt train ... --debug` works as well as `sdt --debug train ...`
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand. Bad input (sdt's own errors, and the OS refusing a path) is one line on
    stderr and exit status 2; anything else is a bug and keeps its traceback (all of them with --debug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..errors import SdtError

    try:
        return args.func(args)
    except (SdtError, OSError) as e:
        if args.debug or isinstance(e, OSError) and e.filename is None:
            raise
        print(f"sdt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"sdt {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_processes()


def _end_processes() -> None:
    """Shut down torchrun's process group before the interpreter exits: a gloo group left to the
    interpreter's teardown can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
