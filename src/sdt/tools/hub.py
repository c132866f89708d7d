"""A finished ``sdt train`` run in timm's Hugging Face hub layout, and loading it back.

    export_run_to_hub("runs/fmnist", "hub/sdt_h_nano-fmnist")     # config.json, model.safetensors, README.md
    model = timm.create_model("local-dir:hub/sdt_h_nano-fmnist", pretrained=True)   # after `import sdt`

The folder is what ``timm.models.push_to_hf_hub`` uploads (``huggingface-cli upload`` it, or load
it with ``hf-hub:`` once uploaded). timm writes it: ``save_for_hf`` saves the weights and a
config.json whose ``pretrained_cfg`` holds the run's preprocessing (input size, mean/std, crop,
interpolation) and label names, so ``timm.data.resolve_data_config(model=model)`` rebuilds the
run's evaluation transform; ``generate_readme`` writes the model card, with the metrics the run
measured (summary.json).

Loading needs ``pretrained=True``: like every timm hub model, ``create_model("local-dir:...")``
without it builds the architecture from config.json with a fresh initialisation.

The exported weights are the run's ``best.safetensors`` (best validation top-1, the weights its
test metrics were measured with). The folder is written whole or not at all: into a temp folder
beside it, renamed into place at the end; an existing non-empty folder is refused unless
``overwrite=True``. The run folder's lock is held meanwhile, so a run still training (or resumed
during the export) is refused.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from timm.models import save_for_hf
from timm.models._hub import generate_readme  # push_to_hf_hub's model card writer

from ..data import FASHION_MNIST_CLASSES, build_transform, raw_dataset
from ..engine import load_config, lock_run_folder, unlock_run_folder
from ..errors import ConfigError, SdtError
from ..files import is_hub_dir, load_hub_model, load_into, load_weights
from ..tasks.classify import TrainConfig, create_model

__all__ = ["export_run_to_hub", "is_hub_dir", "load_hub_model"]

HUB_FILES = ("config.json", "model.safetensors", "README.md")
PathLike = Union[str, Path]


def _normalization(cfg: TrainConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean/std of the run's own evaluation transform (whatever build_transform picked for its data).

    The transform holds them as float32; each is written as the shortest decimal of that float32
    (0.286, not 0.28600001335), which timm's transform turns back into the same float32."""
    normalize = build_transform(cfg.data, None, cfg.model.in_chans).transforms[-1]
    shortest = lambda values: tuple(float(str(np.float32(v))) for v in values)  # noqa: E731
    return shortest(normalize.mean), shortest(normalize.std)


def run_data_config(cfg: TrainConfig) -> Dict[str, Any]:
    """timm's data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``,
    ``interpolation``) of a run's evaluation transform; ``timm.data.create_transform(**it)`` rebuilds it."""
    mean, std = _normalization(cfg)
    size = cfg.data.input_size
    return dict(input_size=(cfg.model.in_chans, size, size), mean=mean, std=std,
                crop_pct=cfg.data.crop_pct, crop_mode="center", interpolation=cfg.data.interpolation)


def run_label_names(cfg: TrainConfig, label_names: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The class names of a run's model in label order: ``label_names`` if given (checked against the
    head), else its dataset's (Fashion-MNIST's, or the training folder's class folders)."""
    num_classes = cfg.model.num_classes
    if label_names is None:
        if cfg.data.dataset == "fashion-mnist":
            label_names = FASHION_MNIST_CLASSES
        else:
            try:
                label_names = raw_dataset(cfg.data, "train", cfg.model.in_chans).classes
            except (SdtError, OSError) as e:
                raise ConfigError(f"the class names of this run come from its training folder {cfg.data.data_dir}, "
                                  f"which cannot be read ({e}); pass label_names (one per class, in label order)") from e
        # a run may have more outputs than the data has classes (model.num_classes); those never trained
        label_names = list(label_names) + [f"unused_{i}" for i in range(len(label_names), num_classes)]
    if len(label_names) != num_classes:
        raise ConfigError(f"{len(label_names)} label names for a {num_classes}-class model; pass one name per class")
    return tuple(str(n) for n in label_names)


def _model_card(cfg: TrainConfig, summary: Dict[str, Any], label_names: Sequence[str], run_dir: Path) -> Dict[str, Any]:
    """timm's model-card dict (for ``generate_readme``) with the run's measured numbers."""
    test, best = summary["test"], summary["best"]
    size = summary.get("input_size", cfg.data.input_size)
    dataset = "fashion_mnist" if cfg.data.dataset == "fashion-mnist" else Path(cfg.data.data_dir or "images").name
    metrics = {
        f"{summary.get('test_split', 'test')} top-1 (these weights)": f"{test['top1']:.2f}%",
        f"{summary.get('test_split', 'test')} top-5": f"{test['top5']:.2f}%",
        f"{summary.get('test_split', 'test')} loss": f"{test['loss']:.4f}",
        "best validation top-1": f"{best['value']:.2f}% (epoch {best['epoch']}, {best['source']} weights)",
    }
    details = {
        "Model Type": "Image classification / feature backbone",
        "Architecture": f"{cfg.model.name} (sdt, https://arxiv.org/abs/2508.09525)",
        "Dataset": dataset,
        "Classes": ", ".join(label_names),
        "Image size": f"{cfg.model.in_chans} x {size} x {size}",
        "Metrics (measured by the training run)": metrics,
    }
    if "params" in summary:
        details["Params (M)"] = f"{summary['params'] / 1e6:.2f}"
    if "flops" in summary:
        details["MMACs"] = f"{summary['flops'] / 1e6:.1f} at {size}x{size}"
    details["Training"] = (f"{cfg.engine.epochs} epochs, global batch {cfg.engine.batch_size}, "
                           f"{summary.get('processes', 1)} process(es), {summary.get('wall_seconds', 0) / 60:.1f} min "
                           f"(`sdt train`, config.yaml of run {run_dir.name})")
    usage = (
        "```python\nimport timm, torch\nimport sdt  # registers the sdt_h_* / rmt_* architectures with timm\n\n"
        "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()  # or 'hf-hub:<repo>'\n"
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
        "probabilities = model(transform(image).unsqueeze(0)).softmax(-1)\n"
        "labels = model.pretrained_cfg['label_names']\n```"
    )
    return dict(description=f"`{cfg.model.name}` trained with `sdt train` on {dataset}.",
                details=details, usage=usage, license="apache-2.0", tags=["image-classification", "timm", "sdt"])


def export_run_to_hub(run_dir: PathLike, out_dir: PathLike, overwrite: bool = False,
                      label_names: Optional[Sequence[str]] = None) -> Path:
    """Write a finished run's best weights in timm's hub layout (``HUB_FILES``) to ``out_dir``.

    Args:
        run_dir: the run folder (config.yaml, best.safetensors, summary.json of a finished run).
        out_dir: the folder to create; it may exist only if empty, unless ``overwrite``.
        overwrite: replace an existing ``out_dir`` (the old folder goes only once the new one is complete).
        label_names: class names in label order; default: the run's dataset's (Fashion-MNIST's, or the
            training folder's class folders).

    Returns the folder written. Raises ``ConfigError`` / ``CheckpointError`` naming the problem, with
    nothing written.
    """
    run, out = Path(run_dir), Path(out_dir)
    for name in ("config.yaml", "summary.json", "best.safetensors"):
        if not (run / name).is_file():
            raise ConfigError(f"{run} is not a finished sdt train run ({name} is missing); "
                              f"let the run finish (or resume it with sdt train --output {run} --resume)")
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ConfigError(f"the hub folder {out} must not be inside the run folder {run}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already holds files; choose a new folder, or pass overwrite=True (--overwrite) "
                          f"to replace it")

    lock_run_folder(run)  # a run still training, or one resumed now, would change best.safetensors under us
    try:
        cfg = load_config(TrainConfig, str(run / "config.yaml"))
        summary = json.loads((run / "summary.json").read_text())
        model = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans)
        load_into(model, load_weights(run / "best.safetensors"), run / "best.safetensors")
        names = run_label_names(cfg, label_names)
        data_config = run_data_config(cfg)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_for_hf(model.eval(), tmp, model_config=dict(label_names=names), data_config=data_config,
                        safe_serialization=True)
            readme = generate_readme(_model_card(cfg, summary, names, run), f"{cfg.model.name} ({run.name})")
            (tmp / "README.md").write_text(readme)
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        unlock_run_folder(run)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` to ``target``; an existing ``target`` is moved aside first
    and deleted only after the rename, so a crash leaves the old folder or the new one."""
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
