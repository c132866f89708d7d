"""``sdt sample``: class-conditional samples from a generation run, as an .npz and a PNG grid."""
import time
from typing import Optional

import torch

from ..engine import setup_distributed
from ..errors import ConfigError
from ..tasks.generate import load_generator
from ..tasks.sampling import check_sampling, class_labels, sample_images, save_samples


def sample_command(run: str, out: str, per_class: int = 10, classes_text: Optional[str] = None,
                   sampler: Optional[str] = None, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                   seed: int = 0, weights: str = "ema", batch_size: int = 250, threads: Optional[int] = None,
                   device: str = "auto") -> str:
    """Sample ``per_class`` images of every class (or of ``classes_text``, "0,3,7"; -1: unconditional) from
    the run folder ``run``; sampler, steps and guidance default to the run's config. Writes ``<out>.npz``
    and ``<out>.png``; returns the line to print. ``threads``: torch's intra-op threads (None: PyTorch's own
    choice, every core); ``device``: auto (the GPU when there is one), cpu or cuda."""
    try:
        classes = None if classes_text is None else [int(c) for c in classes_text.split(",")]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated class indices such as 0,3,7, got {classes_text!r}") from None
    if threads:
        torch.set_num_threads(threads)
    model, cfg = load_generator(run, weights)
    model = model.to(setup_distributed(device).device)
    sampler = sampler or cfg.sample.sampler
    steps = steps if steps is not None else cfg.sample.steps
    cfg_scale = cfg_scale if cfg_scale is not None else cfg.sample.cfg_scale
    check_sampling(steps, cfg_scale, cfg.model.objective, batch_size)
    labels = class_labels(model.num_classes, per_class, classes)
    start = time.perf_counter()
    images = sample_images(model, cfg.model.objective, labels, seed, sampler, steps, cfg_scale,
                           batch_size=batch_size, progress=True)
    paths = save_samples(images, labels, out)
    return (f"{len(images)} samples ({cfg.model.objective}, sampler {sampler or 'default'}, {steps} steps, cfg scale "
            f"{cfg_scale}, {weights} weights, seed {seed}) in {time.perf_counter() - start:.0f}s -> {paths['npz']}, {paths['png']}")
