"""Typed run configs: dataclasses filled from a YAML recipe, then ``section.key=value`` overrides.

    cfg = load_config(TrainConfig, "quick", ["engine.epochs=3", "model.name=rmt_nano"])
    save_config(cfg, "runs/x/config.yaml")

A recipe is a name (``sdt/recipes/<name>.yaml``, shipped with the package) or a path to a YAML file. Unknown
keys and values of the wrong type are errors that name the key, so a typo never trains silently
with a default.
"""
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import yaml

from .checkpoints import atomic_write
from .errors import SdtError

T = TypeVar("T")
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"  # shipped inside the package


class ConfigError(SdtError, ValueError):
    """A recipe or override that does not fit the config schema."""


def available_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


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
