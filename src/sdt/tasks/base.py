"""The base of every task: what a run trains, on which data, and how it is scored and reported.

A task is a class on ``Task``; a run is ``task.train(cfg, output_dir, resume)``, which hands the task
to the engine's run sequence (``sdt.engine.run.train``). That sequence calls, in order:

    build(cfg, dist)            check the config, data and model; return an ``sdt.engine.Built``
    complexity(model, built)    parameters and MACs for the log and the report
    loss(model, batch)          every training step (under autocast)
    evaluate(model, loader, dist)   every validation
    finish(trainer, summary)    every process, after training: ``test_best`` (+ a task's samples)
    report_rows(summary), headline(summary)   the main process: report.md and the last log line

``build`` keeps what the run needs (the resolved config in ``self.cfg``, the datasets) on the task;
it never writes into the config it was given.
"""
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import Batch
from ..engine import Built, DistInfo, Trainer, eval_loader
from ..engine import train as train_run
from ..files import load_into, load_weights
from ..models.complexity import count_flops, count_params

Rows = List[Tuple[str, str]]


class Task:
    """One kind of run. Subclasses set ``config_class`` (the typed config: sections ``engine``,
    ``data``, ``model``, ...), ``metric`` (the key of ``evaluate`` that selects the best weights) and
    ``report_title``, and implement ``build``, ``loss``, ``evaluate``, ``test_set`` and ``report_rows``."""
    config_class: type
    metric: str
    higher_is_better = True
    report_title = "Training report"
    figures: Sequence[str] = ()

    def __init__(self) -> None:
        self.cfg: Any = None  # the run's resolved config, set by build
        self.dist = DistInfo()
        # set before build: the run continues from a checkpoint, so build can skip what it replaces (initial weights)
        self.resuming = False

    def train(self, cfg: Optional[Any] = None, output_dir: Optional[str] = None,
              resume: Optional[str] = None) -> Dict[str, Any]:
        """Train a run of this task as ``cfg`` says, then test its best weights.

        ``resume``: ``"auto"`` (the newest checkpoint of ``output_dir``) or a checkpoint folder; the run
        then continues with the config saved in ``output_dir`` (pass ``cfg=None``; see
        ``sdt.engine.resolve_run``). Returns the run summary (also in summary.json and report.md).
        """
        return train_run(self, cfg, output_dir, resume)

    def run_name(self, cfg: Any) -> str:
        """The run folder's name when no ``output_dir`` is given (a date and time are appended)."""
        return cfg.model.name

    def build(self, cfg: Any, dist_info: DistInfo) -> Built:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, dist_info: DistInfo) -> Dict[str, float]:
        raise NotImplementedError

    def complexity(self, model: nn.Module, built: Built) -> Tuple[int, int]:
        """Parameters and multiply-adds of one forward pass at ``built.input_shape``."""
        return count_params(model), count_flops(model, built.input_shape, *built.flops_inputs)

    # -- after training --------------------------------------------------------------------------

    def test_set(self) -> Dataset:
        """The held-out split the best weights are scored on."""
        raise NotImplementedError

    def test_metrics(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]:
        """The metrics of the test split (``evaluate``'s unless a task reports more there)."""
        return self.evaluate(model, loader, self.dist)

    def evaluate_test(self, model: nn.Module, loader: DataLoader) -> Dict[str, Any]:
        """The summary's test entries: ``test`` (``test_metrics``) and the test throughput, metric included."""
        start = time.perf_counter()
        test = self.test_metrics(model, loader)
        return {"test": test, "test_images_per_s": len(loader.dataset) / max(time.perf_counter() - start, 1e-9)}

    def test_best(self, trainer: Trainer, summary: Dict[str, Any]) -> None:
        """The best validation weights on ``test_set``, into ``summary`` (``evaluate_test``)."""
        test_set = self.test_set()
        if self.dist.distributed:
            dist.barrier()  # rank 0 has written best.safetensors
        best_path = trainer.output_dir / "best.safetensors"
        load_into(trainer.model, load_weights(best_path), best_path)
        loader = eval_loader(test_set, trainer.batch_size_per_rank, self.cfg.data.workers, self.dist)
        summary.update(self.evaluate_test(trainer.model, loader))

    def finish(self, trainer: Trainer, summary: Dict[str, Any]) -> None:
        """What runs on every process after training: the test of the best weights."""
        self.test_best(trainer, summary)

    # -- report ----------------------------------------------------------------------------------

    def report_rows(self, summary: Dict[str, Any]) -> Rows:
        raise NotImplementedError

    def headline(self, s: Dict[str, Any]) -> str:
        """The last log line: the best validation value and the test value of the best weights."""
        return (f"best val {self.metric} {s['best']['value']:.2f} (epoch {s['best']['epoch']}, {s['best']['source']}), "
                f"test {self.metric} {s['test'][self.metric]:.2f}")

    def schedule_row(self, s: Dict[str, Any]) -> Tuple[str, str]:
        engine = self.cfg.engine
        return "epochs / global batch / processes", f"{engine.epochs} / {engine.batch_size} / {s['processes']}"

    @staticmethod
    def best_row(s: Dict[str, Any], label: str, digits: int = 2, unit: str = "") -> Tuple[str, str]:
        """``best val <label>``: the best validation value, its epoch and which weights gave it."""
        best = s["best"]
        return f"best val {label}", f"{best['value']:.{digits}f}{unit} (epoch {best['epoch']}, {best['source']} weights)"

    @staticmethod
    def timing_rows(s: Dict[str, Any], digits: int = 0, wall: str = "wall time (train + val, this segment)") -> Rows:
        return [(wall, f"{s['wall_seconds'] / 60:.1f} min"),
                ("training throughput", f"{s['train_images_per_s']:.{digits}f} images/s")]
