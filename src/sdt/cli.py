"""The ``sdt`` command: a thin layer over the library.

    sdt models            the model table (parameters, GFLOPs, the papers' numbers)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdt", description="Spatial Decay Transformers: models, training, evaluation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_models_parser(subparsers)
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
