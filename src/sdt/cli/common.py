"""What the commands share: deprecated spellings, --output, the run arguments, the shortcut flags and -o
of the training commands, and ``run_task``, which turns them into a config and runs the task."""
import argparse
import sys
from typing import Any, Dict, List, Optional, Tuple

from ..engine.config import available_recipes


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: stores like the new one, with a note on stderr (kept for one release)."""

    def __init__(self, option_strings: List[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_flag(p: argparse.ArgumentParser, old: str, dest: str, new: str, **kwargs: Any) -> None:
    p.add_argument(old, dest=dest, action=_DeprecatedFlag, new=new, help=argparse.SUPPRESS, **kwargs)


def add_input_size_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--input-size C H W (timm's order, as in ``sdt models``) and --img-size N (= C N N) for ``what``."""
    p.add_argument("--input-size", type=int, nargs="+", default=None, metavar="C H W",
                   help=f"{what} as C H W (default: the run's or the model's pretrained cfg)")
    p.add_argument("--img-size", type=int, default=None, help=f"{what} height = width (--input-size C N N)")


def input_size(args: argparse.Namespace, command: str, old_form: str) -> Tuple[Optional[int], Optional[Tuple[int, int]]]:
    """(channels or None, (H, W) or None) from --input-size / --img-size. ``old_form`` ("H W" or "N") is the
    command's former meaning of --input-size: still read, with a note, for one release."""
    size, img_size = args.input_size, args.img_size
    if size is not None and img_size is not None:
        raise SystemExit(f"sdt {command}: error: give --input-size C H W or --img-size N, not both")
    if img_size is not None:
        return None, (img_size, img_size)
    if size is None:
        return None, None
    if len(size) == len(old_form.split()):
        print(f"sdt {command}: note: --input-size {old_form} is deprecated; use --input-size C H W or --img-size N",
              file=sys.stderr)
        return None, (size[-2], size[-1]) if len(size) == 2 else (size[0], size[0])
    if len(size) != 3 or min(size) < 1:
        raise SystemExit(f"sdt {command}: error: --input-size takes three positive numbers C H W (e.g. 3 224 224), "
                         f"got {' '.join(map(str, size))}")
    return size[0], (size[1], size[2])


class _OverrideNotOutput(argparse.Action):
    """``-o`` on a command without config overrides: it means --override everywhere, so an output is --output."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        parser.error(f"-o means --override (section.key=value) in sdt; this command takes none: write the "
                     f"output with --output {values}")


def add_output_argument(p: argparse.ArgumentParser, old: Optional[str] = None, **kwargs: Any) -> None:
    """--output, its deprecated old spelling ``old``, and ``-o`` answered with a pointer to --output."""
    p.add_argument("--output", **kwargs)
    if old:
        add_deprecated_flag(p, old, "output", "--output")
    p.add_argument("-o", action=_OverrideNotOutput, help=argparse.SUPPRESS)


def add_run_arguments(p: argparse.ArgumentParser, recipe_help: str, default_output: str) -> None:
    """--recipe, --output and --resume: what every command that starts or continues a run takes."""
    p.add_argument("--recipe", help=recipe_help)
    p.add_argument("--output", help=f"run folder (default: {default_output}); must be new unless --resume")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue the run in --output from its newest checkpoint (or from CHECKPOINT), with its saved config")


# the shortcut flags of every training command (timm's train.py names) -> their config keys
SHORTCUT_FLAGS = {"epochs": "engine.epochs", "batch_size": "engine.batch_size", "lr": "engine.lr", "seed": "engine.seed",
                  "amp": "engine.amp", "workers": "data.workers", "device": "engine.device"}


def add_override_arguments(p: argparse.ArgumentParser, example: str, task: str, flags: Dict[str, str],
                           default_recipe: Optional[str] = None) -> None:
    """--epochs, --batch-size and -o of every training command; ``task`` (a class of ``sdt.tasks``) runs it,
    ``flags`` maps its shortcut flags to config keys."""
    p.add_argument("--epochs", type=int, help="= -o engine.epochs=...")
    p.add_argument("--batch-size", type=int, help="global batch size (= -o engine.batch_size=...)")
    p.add_argument("--lr", type=float, help="learning rate per engine.lr_base_size images (= -o engine.lr=...)")
    p.add_argument("--seed", type=int, help="= -o engine.seed=...")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision (= -o engine.amp=...)")
    p.add_argument("--workers", type=int, help="data loader processes (= -o data.workers=...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="= -o engine.device=...")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help=f"set any config value, e.g. {example} (repeatable)")
    p.set_defaults(func=run_task, task=task, default_recipe=default_recipe,
                   flags={**flags, **SHORTCUT_FLAGS})


def _recipe_and_overrides(args: argparse.Namespace, flags: Dict[str, str], config_class: type,
                          default_recipe: Optional[str] = None) -> Optional[Any]:
    """The config of a new run from --recipe (or ``default_recipe``), the shortcut flags and -o
    overrides; None for --resume, which continues with the run's saved config."""
    from ..engine import load_config
    from ..errors import ConfigError

    overrides = list(args.override)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"-o {item}: -o means --override and takes section.key=value (e.g. -o engine.epochs=3); "
                              f"the run folder is --output {item}")
    for flag, key in flags.items():
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.resume is not None:
        if overrides or args.recipe:
            raise ConfigError("--resume continues a run with its saved config; drop --recipe and overrides")
        return None
    recipe = args.recipe or default_recipe
    if not recipe:
        raise ConfigError(f"choose a recipe, e.g. --recipe quick (recipes: {', '.join(available_recipes())})")
    return load_config(config_class, recipe, overrides)


def run_task(args: argparse.Namespace) -> int:
    """train, gen-train, detect, segment: the config from the recipe, the shortcut flags and -o, then the task's run."""
    from .. import tasks

    if getattr(args, "attn", None) is not None:
        print(f"sdt {args.command}: note: --attn is deprecated; use --decay", file=sys.stderr)
        args.decay = args.decay or args.attn
    task = getattr(tasks, args.task)()
    task.train(_recipe_and_overrides(args, args.flags, task.config_class, args.default_recipe), args.output, args.resume)
    return 0
