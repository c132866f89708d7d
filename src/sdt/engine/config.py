"""Typed run configs, and the engine's own section with its checks.

A config is a dataclass filled from a YAML recipe, then ``section.key=value`` overrides.

    cfg = load_config(TrainConfig, "quick", ["engine.epochs=3", "model.name=rmt_nano"])
    save_config(cfg, "runs/x/config.yaml")

A recipe is a name (``sdt/recipes/<name>.yaml``, shipped with the package) or a path to a YAML file. Unknown
keys and values of the wrong type are errors that name the key, so a typo never trains silently
with a default.
"""
import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import torch
import yaml
from torch import nn

from ..errors import ConfigError
from ..files import atomic_write
from .dist import DistInfo

T = TypeVar("T")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # shipped inside the package


def available_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


def recipes_for(config_class: type) -> List[str]:
    """The shipped recipes that load as ``config_class`` (a command's help lists the recipes it can run)."""
    fitting = []
    for recipe in available_recipes():
        try:
            load_config(config_class, recipe)
        except ConfigError:
            continue
        fitting.append(recipe)
    return fitting


def recipe_path(recipe: str) -> Path:
    """The YAML file of a recipe name (``quick``) or path (``my/recipe.yaml``)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    path = RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes()) or 'none'} "
                          f"(or pass a path to a .yaml file)")
    return path


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``, converting where YAML is looser (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, key + ".")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool) \
            or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _from_dict(cls: Type[T], values: Dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, why in getattr(cls, "DROPPED_KEYS", {}).items():  # a removed key still loads, with a note
        if key in values:
            warnings.warn(f"config key {prefix}{key} is ignored ({why}); drop it", FutureWarning, stacklevel=2)
            values = {k: v for k, v in values.items() if k != key}
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():  # a key's former name still loads, with a note
        if old in values:
            if new in values:
                raise ConfigError(f"{prefix}{old} is the former name of {prefix}{new}; set only {prefix}{new}")
            warnings.warn(f"config key {prefix}{old} is deprecated; it is read as {prefix}{new}", FutureWarning, stacklevel=2)
            values = {(new if k == old else k): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys here: {', '.join(prefix + n for n in sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        tree = node
    tree[leaf] = value


def load_config(cls: Type[T], recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a recipe (defaults where it is silent) and ``key=value`` overrides (values parsed as YAML)."""
    tree: Dict[str, Any] = {}
    if recipe is not None:
        with open(recipe_path(recipe)) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {recipe} must be a YAML mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. engine.epochs=3)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _from_dict(cls, tree)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain dict (tuples as lists) that ``load_config`` reads back to an equal config."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The engine's section


@dataclass
class EngineConfig:
    """How to train, independent of the task. ``batch_size`` is global (split across processes)."""
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    # optimizer: timm create_optimizer_v2; lr is per lr_base_size images, scaled linearly to batch_size
    opt: str = "adamw"
    lr: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    clip_grad: Optional[float] = None      # max gradient norm (None = off)
    layer_decay: Optional[float] = None    # layer-wise lr decay for fine-tuning, e.g. 0.75 (None = off; timm's)
    # lr multipliers by parameter name (fnmatch pattern -> factor; the first match wins), e.g. {"*gate*": 10}
    lr_scale: Dict[str, float] = field(default_factory=dict)
    # schedule: timm create_scheduler_v2
    sched: str = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    sched_on_updates: bool = True          # False: lr changes once per epoch (RMT/DeiT)
    # model averaging and precision
    ema_decay: Optional[float] = None      # e.g. 0.9998 (None = no EMA)
    ema_warmup: bool = True
    amp: str = "none"                      # "none", "bf16" (CPU or GPU), "fp16" (GPU, with a grad scaler)
    compile: bool = False                  # torch.compile the model
    grad_checkpointing: bool = False       # model.set_grad_checkpointing(): less memory, more compute
    grad_accum_steps: int = 1              # micro-batches per optimizer step (each batch_size / processes / this)
    sync_bn: bool = False                  # SyncBatchNorm when several processes train
    device: str = "auto"                   # "auto", "cpu", "cuda"
    threads: Optional[int] = None          # torch.set_num_threads (None = torch's default)
    # checkpoints and logging
    ckpt_every_steps: int = 500            # also checkpoint every N optimizer steps (0 = epoch ends only)
    keep_checkpoints: int = 2              # how many step checkpoints to keep
    log_every_steps: int = 50
    eval_every_epochs: int = 1



SCHEDULER_CHOICES = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "rsqrt", "constant")  # create_scheduler_v2


def check_engine_settings(cfg: EngineConfig) -> None:
    """Each engine setting on its own: a number in its range, a name among the choices (``ConfigError``)."""
    from timm.optim import list_optimizers

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"engine.{key} must be {rule}, got {getattr(cfg, key)!r}")

    def finite(x: float) -> bool:
        return math.isfinite(x)

    require(cfg.epochs >= 1, "epochs", "at least 1")
    require(cfg.batch_size >= 1, "batch_size", "at least 1 (it is the global batch: images per optimizer step)")
    require(cfg.grad_accum_steps >= 1, "grad_accum_steps", "at least 1 (1 = no accumulation)")
    require(finite(cfg.lr) and cfg.lr > 0, "lr", "a positive number")
    require(cfg.lr_base_size >= 1, "lr_base_size", "at least 1")
    require(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", ">= 0")
    require(finite(cfg.opt_eps) and cfg.opt_eps > 0, "opt_eps", "a positive number")
    require(cfg.layer_decay is None or finite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1, "layer_decay",
            "in (0, 1], e.g. 0.75 (each layer below the head gets that factor of the lr once more), or null (off)")
    require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v) and v > 0 for v in cfg.lr_scale.values()),
            "lr_scale", "a mapping of parameter-name patterns to positive factors, e.g. {'*gate*': 10}")
    require(cfg.clip_grad is None or finite(cfg.clip_grad) and cfg.clip_grad > 0, "clip_grad", "a positive number or null (off)")
    require(cfg.opt.lower() in list_optimizers(), "opt", "a timm optimizer name (e.g. adamw, sgd, lamb; "
                                                         "timm.optim.list_optimizers() lists them)")
    require(cfg.sched in SCHEDULER_CHOICES, "sched", f"one of {', '.join(SCHEDULER_CHOICES)}")
    require(finite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0, "warmup_epochs", ">= 0")
    require(finite(cfg.warmup_lr) and cfg.warmup_lr >= 0, "warmup_lr", ">= 0")
    require(finite(cfg.min_lr) and cfg.min_lr >= 0, "min_lr", ">= 0")
    require(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, "ema_decay", "in (0, 1), e.g. 0.9998, or null (no EMA)")
    require(cfg.amp in ("none", "bf16", "fp16"), "amp", "none, bf16 or fp16")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
    require(cfg.threads is None or cfg.threads >= 1, "threads", "at least 1, or null (torch's default)")
    require(cfg.ckpt_every_steps >= 0, "ckpt_every_steps", ">= 0 (0 = at epoch ends only)")
    require(cfg.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
    require(cfg.log_every_steps >= 1, "log_every_steps", "at least 1")
    require(cfg.eval_every_epochs >= 1, "eval_every_epochs", "at least 1")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 GEMMs in hardware (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_engine_config(cfg: EngineConfig, dist_info: DistInfo, num_train: int, model: Optional[nn.Module] = None) -> None:
    """Settings that cannot work on this machine, data and ``model`` (the settings on their own are
    ``check_engine_settings``'s, which the run sequence calls first): a ``ConfigError`` before anything
    runs or is written."""
    per_step = dist_info.world_size * cfg.grad_accum_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f"engine.batch_size={cfg.batch_size} (the global batch) must be divisible by the number of "
                          f"processes ({dist_info.world_size}) x engine.grad_accum_steps ({cfg.grad_accum_steps}); "
                          f"choose grad_accum_steps so that batch_size / (processes x grad_accum_steps) is an integer")
    if num_train < cfg.batch_size:
        raise ConfigError(f"the training set ({num_train} images) is smaller than one batch "
                          f"(engine.batch_size={cfg.batch_size}); lower the batch size")
    if cfg.amp == "fp16" and dist_info.device.type != "cuda":
        raise ConfigError("engine.amp=fp16 needs a GPU; on CPU use engine.amp=bf16")
    if cfg.amp == "bf16" and dist_info.device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("engine.amp=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): torch emulates bf16 "
                      "there, which is many times slower than float32 (sdt_h_tiny inference ran at 0.08x float32 on an "
                      "AVX2-only EPYC, docs/benchmarks.md); use engine.amp=none on this machine", stacklevel=2)
    if cfg.sync_bn and dist_info.distributed and dist_info.device.type != "cuda":
        raise ConfigError("engine.sync_bn=true needs GPUs (torch's SyncBatchNorm is CUDA-only); on CPU each "
                          "process normalises with its own batch statistics: set engine.sync_bn=false")
    if cfg.grad_checkpointing and model is not None and not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"engine.grad_checkpointing=true, but {type(model).__name__} has no set_grad_checkpointing(); "
                          f"set engine.grad_checkpointing=false")

