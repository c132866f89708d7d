"""Run folders and the run sequence: resolve a new or resumed run, lock its folder, build the task,
train, test, and write summary.json, curves.png and report.md. It knows no task by name: it calls
the methods of the ``RunTask`` it is given (``sdt.tasks.Task`` implements them).

    summary = train(Classify(), cfg, output_dir="runs/x")        # what Classify().train(cfg, "runs/x") does

Run layout (``output_dir``)::

    config.yaml                  the fully resolved config (``start_run``)
    run.lock                     the folder's lock while a process uses it
    metrics.jsonl                one JSON record per log step and per evaluation
    tb/                          TensorBoard events
    train.log                    the log
    checkpoints/step-00001234/   model.safetensors, ema.safetensors, state.pt (written as a whole:
                                 temp folder + rename); the newest one is ``last``
    best.safetensors             weights with the best validation metric (model or EMA)
    summary.json, report.md, curves.png   written at the end

The pieces stay public for a loop of one's own:

    cfg, info, out, resume_from = resolve_run(TrainConfig, cfg, output_dir, resume, "name")
    trainer = Trainer(cfg.engine, model, task, train_set, val_set, out, info)
    with start_run(cfg, out, info, resume_from is not None):
        summary = trainer.fit()
"""
import errno
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError, SdtError
from ..files import atomic_write
from .checkpoints import find_last_checkpoint, remove_temp_checkpoints
from .config import check_engine_settings, config_to_dict, load_config, save_config
from .dist import DistInfo, setup_distributed
from .log import final_val_metrics, read_metrics, setup_logging
from .plots import plot_curves
from .trainer import Task, Trainer

_logger = logging.getLogger("sdt")


RUN_LOCK = "run.lock"
_held_locks: Dict[Path, Any] = {}  # run folder -> open lock file, for the runs of this process


def lock_run_folder(output_dir: Path) -> None:
    """Take the run folder's exclusive lock (a POSIX lock, ``fcntl.lockf``, on ``<run>/run.lock``, which
    holds the owner's PID and host), or raise a ``ConfigError`` naming the process that holds it. The
    OS drops the lock when its process ends, however it ends; unlike ``flock``, the lock is not shared
    with forked children (DataLoader workers), so a killed run's lingering workers do not keep it.
    POSIX locks are dropped when their process closes *any* descriptor of the file, so nothing in a
    running process may open run.lock a second time. A no-op where ``fcntl`` does not exist (Windows)."""
    key = Path(output_dir).resolve()
    if key in _held_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    lock_file = open(key / RUN_LOCK, "a+")
    try:
        fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise ConfigError(f"{output_dir} is in use by another sdt run ({holder}); wait for it to finish or stop it, "
                          f"then retry (or choose another --output)") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock_file.flush()
    _held_locks[key] = lock_file


def unlock_run_folder(output_dir: Path) -> None:
    """Release the lock ``lock_run_folder`` took (the file stays; it is free again)."""
    lock_file = _held_locks.pop(Path(output_dir).resolve(), None)
    if lock_file is not None:
        lock_file.close()


def check_output_dir(output_dir: Path, resume: bool) -> None:
    """A new run needs a new (or empty) folder, so an earlier run's files are never overwritten;
    a resumed run needs the folder of a run."""
    output_dir = Path(output_dir)
    if resume:
        if not (output_dir / "config.yaml").is_file():
            raise CheckpointError(f"--resume: {output_dir} holds no run (config.yaml is missing)")
    elif output_dir.exists() and any(p.name != RUN_LOCK for p in output_dir.iterdir()):
        raise ConfigError(f"{output_dir} already holds files; pass --resume to continue that run, "
                          f"or choose a new --output folder")


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:  # sections, not model.kwargs
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resumed_config_changes(passed: Any, saved: Any) -> List[str]:
    """The keys (``section.key``) where ``passed`` sets a value other than the ``saved`` run config's;
    a key ``passed`` leaves unset (None) that the run resolved (``model.num_classes``) is no change."""
    new, old = _flat(config_to_dict(passed)), _flat(config_to_dict(saved))
    return sorted(k for k, v in new.items() if v is not None and old.get(k) != v)


def resolve_run(config_class: type, cfg: Optional[Any], output_dir: Optional[str], resume: Optional[str],
                default_name: Union[str, Callable[[Any], str]]) -> Tuple[Any, DistInfo, Path, Optional[Path]]:
    """The config, processes, run folder and checkpoint of a new or resumed run; writes nothing.

    ``resume``: None (new run), ``"auto"`` (the newest checkpoint of ``output_dir``) or a checkpoint
    folder. A resumed run continues with the config saved in ``output_dir``: pass ``cfg=None``; a
    ``cfg`` that sets other values than the saved one is ignored with a ``UserWarning`` naming the
    keys (a run cannot change its config half-way). A new run with ``cfg=None`` uses
    ``config_class()``. Without ``output_dir`` a new run goes to ``runs/<default_name>-<date>-<time>``
    (the same name on every rank); ``default_name`` may be a function of the config.
    """
    resume_from = None
    if resume is not None:
        if output_dir is None:
            raise ConfigError("--resume needs the --output folder of the run to continue")
        check_output_dir(Path(output_dir), resume=True)
        resume_from = find_last_checkpoint(Path(output_dir)) if resume == "auto" else Path(resume)
        saved = load_config(config_class, str(Path(output_dir) / "config.yaml"))
        changed = [] if cfg is None else resumed_config_changes(cfg, saved)
        if changed:
            warnings.warn(f"resume continues {output_dir} with its saved config.yaml; the config passed sets other "
                          f"values for {', '.join(changed)}, which are ignored (start a new run to change them)",
                          UserWarning, stacklevel=4)  # the caller of Task.train()
        cfg = saved
    elif cfg is None:
        cfg = config_class()
    info = setup_distributed(cfg.engine.device)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if output_dir is None:
        name = default_name(cfg) if callable(default_name) else default_name
        box = [f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if info.distributed:
            dist.broadcast_object_list(box, src=0)
        output_dir = box[0]
    return cfg, info, Path(output_dir), resume_from


class RunHandle:
    """What ``start_run`` returns: ``with start_run(...):`` releases the run folder's lock at the end
    of the block; without ``with`` the lock is held until the process ends."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> "RunHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        unlock_run_folder(self.out)


def start_run(cfg: Any, out: Path, info: DistInfo, resumed: bool) -> RunHandle:
    """After every check has passed: lock the run folder (held until the end of ``with start_run(...):``),
    refuse a folder that holds another run, remove the temp folders of saves killed mid-way, write
    ``config.yaml`` (new runs), start logging. All ranks call it; only rank 0 touches the folder, and
    an error there is raised on every rank."""
    # Only rank 0 judges the folder: another rank may look after rank 0 has written config.yaml.
    error, removed = None, []
    if info.is_main:
        try:
            check_output_dir(out, resumed)  # refuse before touching anything
            out.mkdir(parents=True, exist_ok=True)
            lock_run_folder(out)
            check_output_dir(out, resumed)  # again under the lock: another run may have started in between
            removed = remove_temp_checkpoints(out)
            if not resumed:
                save_config(cfg, out / "config.yaml")
        except SdtError as e:
            unlock_run_folder(out)
            error = e
    if info.distributed:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            error = ConfigError(box[0])
    if error is not None:
        raise error
    setup_logging(out, info.is_main)
    if removed:
        _logger.info("removed %d temp checkpoint folder(s) left by an interrupted save: %s",
                     len(removed), ", ".join(p.name for p in removed))
    return RunHandle(out)


# ---------------------------------------------------------------------------------------------
# One run, start to end


@dataclass(frozen=True)
class Built:
    """What a task's ``build`` hands the run sequence, after every check of its config, data and model.

    ``config`` is the run's config with what the task resolved (``model.num_classes``, ...), as
    config.yaml saves it; the config the task was given is left as it was. ``input_shape`` (C, H, W)
    and ``flops_inputs`` (the model's inputs after the image, e.g. a DiT's timestep and label, each
    (1,)) are what the parameter and MAC counts use; ``name`` is the model and ``data_name`` the data
    as the log names them; ``summary`` holds the task's entries known before training. ``workers``
    and ``repeated_aug`` are the task's loader settings."""
    config: Any
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    name: str
    data_name: str
    input_shape: Tuple[int, int, int]
    flops_inputs: Sequence[Tensor] = ()
    summary: Dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    repeated_aug: int = 1


class RunTask(Task, Protocol):
    """What the run sequence calls, in this order: ``run_name`` (the default folder name), ``build``,
    ``complexity``, the loop's ``loss`` / ``evaluate``, ``finish`` (every process: test the best weights, samples),
    then on the main process ``report_rows`` and ``headline``."""
    config_class: type
    report_title: str
    figures: Sequence[str]

    def run_name(self, cfg: Any) -> str: ...

    def build(self, cfg: Any, dist_info: DistInfo) -> Built: ...

    def complexity(self, model: nn.Module, built: Built) -> Tuple[int, int]:
        """Parameters and multiply-adds of one forward pass at ``built.input_shape``."""

    def finish(self, trainer: Trainer, summary: Dict[str, Any]) -> None: ...

    def report_rows(self, summary: Dict[str, Any]) -> List[Tuple[str, str]]: ...

    def headline(self, summary: Dict[str, Any]) -> str: ...


def render_report(title: str, rows: Sequence[Tuple[str, str]], figures: Sequence[str] = ()) -> str:
    """report.md: a two-column table of ``rows``, then ``figures`` and the training curves."""
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    shown = "".join(f"{figure}\n\n" for figure in figures)
    return (f"# {title}\n\n| | |\n|---|---|\n{table}\n\n{shown}![curves](curves.png)\n\n"
            f"Config: `config.yaml`; metrics: `metrics.jsonl`, `tb/`.\n")


def train(task: RunTask, cfg: Optional[Any] = None, output_dir: Optional[str] = None,
          resume: Optional[str] = None) -> Dict[str, Any]:
    """Train one run of ``task``, start to end: resolve the run (``resolve_run``), check the engine
    settings, ``task.build`` (it checks the config, data and model and may fail: nothing is written
    yet), build the ``Trainer`` (checks the settings against this machine and data, loads a resumed
    run's checkpoint), then, holding the run folder's lock (``start_run``), train, ``task.finish``,
    and write summary.json, curves.png and report.md. Returns the summary."""
    cfg, info, out, resume_from = resolve_run(task.config_class, cfg, output_dir, resume, task.run_name)
    check_engine_settings(cfg.engine)
    task.resuming = resume_from is not None  # the checkpoint's weights replace any initial ones
    built = task.build(cfg, info)
    trainer = Trainer(cfg.engine, built.model, task, built.train_set, built.val_set, out, info,
                      workers=built.workers, resume_from=resume_from, repeated_aug=built.repeated_aug)
    # counted once the Trainer has accepted the model (a model it refuses may not even run a forward pass)
    params, flops = task.complexity(trainer.model, built)
    size = "x".join(map(str, built.input_shape[1:]))
    with start_run(built.config, out, info, resume_from is not None):  # holds the run folder's lock until the end
        _logger.info("model %s: %.2fM parameters, %.1f MMACs at %s; %d processes on %s; output %s",
                     built.name, params / 1e6, flops / 1e6, size, info.world_size, info.device, out)
        _logger.info("data %s: %d train / %d val images", built.data_name, len(built.train_set), len(built.val_set))
        wall_start = time.perf_counter()
        summary = trainer.fit()
        summary.update(built.summary, params=params, flops=flops, input_size=built.input_shape[-1],
                       processes=info.world_size, wall_seconds=time.perf_counter() - wall_start)
        task.finish(trainer, summary)
        if info.is_main:
            summary["final_val"] = final_val_metrics(out)
            plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png", task.metric)
            atomic_write(out / "summary.json", json.dumps(summary, indent=2))
            atomic_write(out / "report.md", render_report(task.report_title, task.report_rows(summary), task.figures))
            _logger.info("done: %s, report %s", task.headline(summary), out / "report.md")
    return summary
