"""The ``sdt`` command: a thin layer over the library.

    sdt models            the model table (parameters, GFLOPs, the papers' numbers)
    sdt train             train a classifier from a recipe (quick, fashion-mnist, imagenet)
    sdt eval              evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix

Each subcommand is one ``add_*_parser`` function (its arguments) and one ``run_*`` function.
"""
import argparse
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


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier from a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an image classifier. A recipe (YAML) sets every option; -o section.key=value "
                    "changes one. The run folder gets config.yaml (fully resolved), checkpoints, metrics.jsonl, "
                    "TensorBoard logs, curves.png and report.md.",
        epilog="examples:\n"
               "  sdt train --recipe quick                                   # Fashion-MNIST, a few minutes on a CPU\n"
               "  sdt train --recipe fashion-mnist --model rmt_nano --output runs/rmt\n"
               "  sdt train --recipe imagenet --data-dir /data/imagenet -o engine.amp=bf16\n"
               "  sdt train --output runs/rmt --resume                       # continue after a crash\n"
               "  torchrun --nproc-per-node 4 -m sdt.cli train --recipe imagenet --data-dir /data/imagenet")
    p.add_argument("--recipe", help="recipe name (quick, fashion-mnist, imagenet) or path to a YAML file")
    p.add_argument("--output", help="run folder (default: runs/<model>-<date>-<time>); must be new unless --resume")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue the run in --output from its newest checkpoint (or from CHECKPOINT), "
                        "with its saved config")
    p.add_argument("--model", help="model name (= -o model.name=...)")
    p.add_argument("--data-dir", help="dataset folder (= -o data.data_dir=...)")
    p.add_argument("--epochs", type=int, help="= -o engine.epochs=...")
    p.add_argument("--batch-size", type=int, help="global batch size (= -o engine.batch_size=...)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config value, e.g. -o engine.lr=1e-3 -o aug.mixup=0 (repeatable)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .train import TrainConfig, train

    overrides = list(args.override)
    for flag, key in (("model", "model.name"), ("data_dir", "data.data_dir"), ("epochs", "engine.epochs"),
                      ("batch_size", "engine.batch_size")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.resume is not None:
        if args.recipe or overrides:
            raise ConfigError("--resume continues a run with its saved config; drop --recipe and overrides")
        cfg = None
    else:
        if not args.recipe:
            raise ConfigError("choose a recipe, e.g. --recipe quick (recipes: quick, fashion-mnist, imagenet)")
        cfg = load_config(TrainConfig, args.recipe, overrides)
    train(cfg or TrainConfig(), args.output, args.resume)
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (top-1/top-5, per-class accuracy, confusion matrix, throughput)",
        description="Evaluate a checkpoint: a run folder (its best weights), a checkpoint folder or a .safetensors "
                    "file. Model and data come from the run's config.yaml unless given. Writes eval.json and "
                    "confusion.png to --output (default: <run>/eval-<split>-<size>px).")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    p.add_argument("--input-size", type=int, help="test-time resolution (default: the training resolution)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model", help="model name (needed for a weights file outside a run folder)")
    p.add_argument("--dataset", choices=("fashion-mnist", "folder"), help="default: the run's dataset")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    p.add_argument("--ema", action="store_true", help="for a checkpoint folder: evaluate its EMA weights")
    p.add_argument("--output", help="where eval.json and confusion.png go")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint, format_eval

    result = evaluate_checkpoint(args.checkpoint, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                                 split=args.split, input_size=args.input_size, batch_size=args.batch_size,
                                 output_dir=args.output, use_ema=args.ema)
    print(format_eval(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdt", description="Spatial Decay Transformers: models, training, evaluation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_models_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .config import ConfigError
    from .data import DataError
    from .engine import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileExistsError) as e:
        print(f"sdt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
