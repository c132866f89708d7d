"""Logging and metrics: the log (stderr and train.log), progress bars, metrics.jsonl and TensorBoard."""
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import Tensor

from ..files import atomic_write
from .dist import DistInfo, all_reduce_sum

if TYPE_CHECKING:
    import tqdm

_logger = logging.getLogger("sdt")


class MetricsLogger:
    """JSON lines + TensorBoard on the main process; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: Optional[int]):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what a killed run logged after its last checkpoint: it is about to be redone.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=resume_step)

    def log(self, kind: str, step: int, epoch: float, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "epoch": round(epoch, 4), **values}) + "\n")
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def final_val_metrics(output_dir: Path) -> Dict[str, float]:
    """The last validation record of a run's metrics.jsonl, without its bookkeeping keys."""
    last = [r for r in read_metrics(Path(output_dir) / "metrics.jsonl") if r["kind"] == "val"][-1]
    return {k: v for k, v in last.items() if k not in ("kind", "step", "epoch")}


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "img") -> "tqdm.tqdm":
    """A tqdm bar counting images (or ``unit``) on stderr (rate, ETA); in a log file (not a terminal) it
    writes a line every 30 s instead of every second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit == "img", desc=desc, dynamic_ncols=True,
                disable=not enabled, mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def setup_logging(output_dir: Optional[Path], is_main: bool) -> None:
    """Log to stderr (and ``output_dir/train.log``) on the main process; warnings only elsewhere."""
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    _logger.handlers.clear()
    _logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and is_main:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        _logger.addHandler(handler)



class StepLog:
    """The ``train`` records of metrics.jsonl: per log interval the mean loss, learning rate, images/s
    and skipped images, reduced over processes. Also times the optimizer steps (``add_step``)."""

    def __init__(self, logger: MetricsLogger, dist_info: DistInfo):
        self.logger, self.dist = logger, dist_info
        self.skipped_total, self.skipped_reported = 0, 0
        self.start_interval()

    def start_interval(self) -> None:
        self.loss_sum, self.loss_count, self.images_per_step = torch.zeros((), device=self.dist.device), 0, 0
        self.interval_start = self.tick = time.perf_counter()

    def restart_clock(self) -> None:
        """Leave the time since the last step (a checkpoint's) out of the training time."""
        self.tick = time.perf_counter()

    def add_step(self, loss: Tensor, images: int) -> float:
        """Count one optimizer step of ``images`` images; returns its seconds."""
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        self.loss_sum += loss.float()
        self.loss_count, self.images_per_step = self.loss_count + 1, images
        return seconds

    def write(self, step: int, epoch: float, lr: float, bar: "tqdm.tqdm") -> None:
        """One ``train`` record for the steps since the last one, then a new interval."""
        stats = all_reduce_sum(torch.stack([self.loss_sum, torch.tensor(float(self.skipped_total), device=self.dist.device)]),
                               self.dist)
        mean_loss = stats[0].item() / (max(self.loss_count, 1) * self.dist.world_size)
        elapsed = time.perf_counter() - self.interval_start
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        self.logger.log("train", step, epoch, {"loss": mean_loss, "lr": lr,
                                                "images_per_s": self.loss_count * self.images_per_step / elapsed,
                                                "skipped_images": stats[1].item()})
        if stats[1].item() > self.skipped_reported:
            self.skipped_reported = int(stats[1].item())
            _logger.warning("%d unreadable images skipped so far", self.skipped_reported)
        self.start_interval()
