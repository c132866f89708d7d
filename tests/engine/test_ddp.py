"""Two gloo processes never fall out of step: a micro-batch that lost every image on one process
(unreadable files) is dropped by all processes together, with and without gradient accumulation."""
import multiprocessing
import os
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import free_port
from torch import nn
from torch.utils.data import Dataset

from sdt.data import Batch
from sdt.engine import DistInfo, EngineConfig, ResumableSampler, Trainer, setup_distributed

N_IMAGES, BATCH, SEED = 64, 8, 0


class _Images(Dataset):
    """Random 4-pixel "images"; the samples of ``unreadable`` read as None, as unreadable files do."""

    def __init__(self, unreadable=()):
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N_IMAGES, 4, generator=generator), torch.arange(N_IMAGES) % 2
        self.unreadable, self.classes = set(unreadable), ["a", "b"]

    def __len__(self):
        return N_IMAGES

    def __getitem__(self, i):
        return None if i in self.unreadable else (self.x[i], int(self.y[i]))


class _Task:
    metric = "top1"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.images), batch.targets)

    def evaluate(self, model, loader, dist_info) -> Dict[str, float]:
        return {"top1": 0.0}


def _rank1_step1_images(accum: int):
    """The images of process 1's first micro-batch of step 1 (epoch 0): make all of them unreadable."""
    sampler = ResumableSampler(_Images(), DistInfo(rank=1, world_size=2), SEED, BATCH // 2)
    sampler.set_position(0, 0)
    micro = BATCH // 2 // accum
    return list(sampler)[BATCH // 2:BATCH // 2 + micro]


def _worker(rank: int, port: int, out: str, accum: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    cfg = EngineConfig(epochs=2, batch_size=BATCH, grad_accum_steps=accum, lr=1e-2, warmup_epochs=0, sched="constant",
                       ckpt_every_steps=0, log_every_steps=1, seed=SEED, device="cpu")
    trainer = Trainer(cfg, model, _Task(), _Images(_rank1_step1_images(accum)), _Images(), Path(out), info, workers=0)
    summary = trainer.fit()
    save_file({**trainer.model.state_dict(), "global_step": torch.tensor(summary["global_step"])},
              os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 2])
def test_a_process_whose_micro_batch_is_all_unreadable_does_not_hang_the_others(tmp_path: Path, accum: int):
    context = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, port, str(tmp_path), accum)) for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
    hung = [w for w in workers if w.is_alive()]
    for w in hung:
        w.kill()
    assert not hung, "the processes fell out of step and waited for each other"
    assert [w.exitcode for w in workers] == [0, 0]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    steps_per_epoch = N_IMAGES // BATCH
    # with one micro-batch per step, step 1 is dropped on both processes; with two, only its first half
    expected_steps = 2 * steps_per_epoch - (1 if accum == 1 else 0)
    assert [int(w.pop("global_step")) for w in weights] == [expected_steps] * 2
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the processes still agree
