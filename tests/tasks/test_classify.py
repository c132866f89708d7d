"""End-to-end training: outputs, errors before any file is written, checkpoint safety, exact resume
after SIGKILL, and 2-process DDP against 1 process."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import free_port, tiny_overrides
from sdt.cli import main
from sdt.errors import ConfigError
from sdt.engine.checkpoints import checkpoint_dirs, load_train_state
from sdt.errors import CheckpointError
from sdt.files import load_weights
from sdt.engine import save_config
from sdt.engine import DistInfo, EngineConfig, check_engine_config, lock_run_folder, start_run, unlock_run_folder
from sdt.tasks import Classify, TrainConfig

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _train_args(output: Path, overrides: List[str]) -> List[str]:
    return ["train", "--recipe", "quick", "--output", str(output)] + [a for o in overrides for a in ("-o", o)]


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sdt(args: List[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sdt.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _final_weights(run: Path) -> Dict[str, torch.Tensor]:
    last = checkpoint_dirs(run)[-1]
    return {**load_file(str(last / "model.safetensors")),
            **{"ema." + k: v for k, v in load_file(str(last / "ema.safetensors")).items()}}


def _val_records(run: Path) -> List[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]


def test_train_writes_a_complete_run_and_eval_works_at_another_resolution(fake_fmnist: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    # bf16 autocast and gradient checkpointing on, to run those paths too
    overrides = tiny_overrides(fake_fmnist, **{"engine.ema_decay": "0.9", "data.workers": "1", "engine.amp": "bf16",
                                               "engine.grad_checkpointing": "true"})
    assert main(_train_args(run, overrides)) == 0
    for name in ("config.yaml", "metrics.jsonl", "train.log", "best.safetensors", "curves.png", "report.md", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2 * (160 // 16)
    assert 0 <= summary["test"]["top1"] <= 100 and summary["test"]["top5"] >= summary["test"]["top1"]
    report = (run / "report.md").read_text()
    assert f"{summary['test']['top1']:.2f}%" in report and "parameters" in report and "images/s" in report
    vals = _val_records(run)
    assert len(vals) == 2 and {"top1", "top5", "loss", "ema_top1"} <= set(vals[0])
    # the cag model logs how far its gates moved, per gate in metrics.jsonl, the mean alone on the console
    assert {"gate_drift", "gate_drift.0", "ema_gate_drift"} <= set(vals[0]) and vals[-1]["gate_drift"] > 0
    log = (run / "train.log").read_text()
    assert "gate_drift " in log and "gate_drift.0" not in log
    # the resolved config has the dataset's shape filled in
    assert "num_classes: 10" in (run / "config.yaml").read_text() and "in_chans: 1" in (run / "config.yaml").read_text()
    # retention: ckpt every 3 steps + epoch ends, only the newest 2 kept
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000018", "step-00000020"]

    capsys.readouterr()
    assert main(["eval", str(run), "--input-size", "24", "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "eval-test-24px" / "eval.json").read_text())
    assert result["input_size"] == 24 and result["images"] == 60 and len(result["per_class"]) == 10
    assert (run / "eval-test-24px" / "confusion.png").stat().st_size > 1000
    assert f"top-1 {result['top1']:.2f}%" in printed
    assert sum(map(sum, result["confusion"])) == 60


def test_help_lists_the_subcommands_and_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--recipe" in text and "--resume" in text and "torchrun" in text and "quick" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    eval_help = capsys.readouterr().out
    assert "--img-size" in eval_help and "--crop-pct" in eval_help


def test_bad_setup_fails_before_writing_anything(fake_fmnist: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, tiny_overrides(fake_fmnist, **{"model.in_chans": "3"}))) == 2
    assert "images have 1 channel(s) but model.in_chans=3" in capsys.readouterr().err
    assert main(_train_args(run, tiny_overrides(fake_fmnist, **{"data.input_size": "8"}))) == 2
    assert "total stride is 16" in capsys.readouterr().err
    assert main(_train_args(run, tiny_overrides(tmp_path / "nowhere"))) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not run.exists()


def test_existing_run_is_never_overwritten_and_bad_checkpoints_are_named(fake_fmnist: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(fake_fmnist, **{"engine.epochs": "1", "engine.ema_decay": "0.9"})
    assert main(_train_args(run, overrides)) == 0
    before = _snapshot(run)
    assert main(_train_args(run, overrides)) == 2
    assert "already holds files; pass --resume" in capsys.readouterr().err
    assert _snapshot(run) == before

    last = checkpoint_dirs(run)[-1]
    # truncated weights
    weights = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(last / "model.safetensors")
    assert main(["train", "--output", str(run), "--resume"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    # foreign weights: a different model's state dict
    save_file({"fc.weight": torch.zeros(2, 2)}, str(last / "model.safetensors"))
    assert main(["train", "--output", str(run), "--resume"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    # truncated and foreign training state; a pickle that would run code is refused, not executed
    state = (last / "state.pt").read_bytes()
    (last / "state.pt").write_bytes(state[:100])
    with pytest.raises(CheckpointError, match="cannot load training state"):
        load_train_state(last)
    torch.save({"something": "else"}, last / "state.pt")
    with pytest.raises(CheckpointError, match="not an sdt training state"):
        load_train_state(last)
    torch.save({"format": "x", "evil": Path("/")}, last / "state.pt")
    with pytest.raises(CheckpointError, match="cannot load training state"):
        load_train_state(last)
    assert main(["train", "--output", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_a_run_folder_is_locked_while_a_process_uses_it_and_orphaned_temp_folders_go(fake_fmnist: Path, tmp_path: Path,
                                                                                       capsys):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    overrides = tiny_overrides(fake_fmnist, **{"engine.epochs": "1"})
    assert main(_train_args(run, overrides)) == 0
    fresh.mkdir()
    before = _snapshot(run)  # before locking: reading run.lock in the holding process would drop a POSIX lock
    lock_run_folder(run)  # this process now holds both folders, as a live run would
    lock_run_folder(fresh)
    mtimes = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "run.lock"}
    try:
        for args in (["train", "--output", str(run), "--resume"], _train_args(fresh, overrides)):
            other = _sdt(args)
            out, _ = other.communicate(timeout=300)
            assert other.returncode == 2, out
            assert f"is in use by another sdt run (pid {os.getpid()} on " in out and "Traceback" not in out, out
        assert sorted(p.name for p in fresh.iterdir()) == ["run.lock"]
        assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "run.lock"} == mtimes
    finally:
        unlock_run_folder(run)
        unlock_run_folder(fresh)
    assert {k: v for k, v in _snapshot(run).items() if k != "run.lock"} == {k: v for k, v in before.items() if k != "run.lock"}
    # a save killed mid-way leaves a temp folder: the next start removes it, under the lock
    orphan = run / "checkpoints" / ".tmp-step-00000011-99999"
    orphan.mkdir()
    save_file({"w": torch.zeros(1000)}, str(orphan / "model.safetensors"))
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume"]) == 0
    assert "removed 1 temp checkpoint folder(s) left by an interrupted save: .tmp-step-00000011-99999" in capsys.readouterr().err
    assert not orphan.exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(steps) == len(set(steps))


def test_only_rank_0_judges_the_run_folder(tmp_path: Path):
    """Under torchrun, rank 0 may have written config.yaml before rank 1 starts: rank 1 must not
    then call the folder "another run" (CI failed this way in test_gen_train_runs_under_torchrun)."""
    run = tmp_path / "run"
    cfg = TrainConfig()
    run.mkdir()
    save_config(cfg, run / "config.yaml")  # what rank 0 has already written
    with start_run(cfg, run, DistInfo(rank=1, world_size=1), resumed=False):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    with pytest.raises(ConfigError, match="already holds files"):
        start_run(cfg, run, DistInfo(rank=0, world_size=1), resumed=False)


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(fake_fmnist: Path, tmp_path: Path):
    # 3 epochs x 10 steps, a checkpoint every 3 steps, one loader worker, EMA and augmentation on:
    # every source of randomness the loop has (augmentation, drop path, Mixup, workers) is exercised.
    overrides = tiny_overrides(fake_fmnist, **{
        "engine.epochs": "3", "engine.ema_decay": "0.9", "data.workers": "1", "model.drop_path_rate": "0.1",
        "aug.mixup": "0.2", "aug.cutmix": "0.2", "aug.reprob": "0.25", "engine.keep_checkpoints": "50"})
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = _sdt(_train_args(reference, overrides))
    victim = _sdt(_train_args(killed, overrides))
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000012").is_dir():  # mid-epoch 2
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "report.md").exists()
    done_steps = max(int(p.name.split("-")[1]) for p in checkpoint_dirs(killed))
    assert done_steps < 30, "the run finished before it could be killed"

    resumed = _sdt(["train", "--output", str(killed), "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"global step {done_steps})" in out
    assert "No CUDA runtime is found" not in out  # torch's noise when the CPU kernel is built
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out

    a, b = _final_weights(reference), _final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert _val_records(reference) == _val_records(killed)
    ref_train = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    got_train = [r for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [(r["step"], r["loss"]) for r in ref_train] == [(r["step"], r["loss"]) for r in got_train]


def test_two_processes_reach_the_weights_of_one(fake_fmnist: Path, tmp_path: Path):
    # Same global batch (16): 1 process x 16 vs 2 processes x 8 (gloo). The model is a LayerNorm-only
    # timm ViT: BatchNorm statistics depend on the per-process batch, and torch's SyncBatchNorm is
    # CUDA-only, so BatchNorm models match only on GPUs with engine.sync_bn. Nothing stochastic
    # depends on the batch split here (no drop path, no Mixup); only the order of float sums differs.
    overrides = tiny_overrides(fake_fmnist, **{
        "model.name": "vit_tiny_patch16_224", "model.kwargs": "{img_size: 16, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 1}",
        "engine.epochs": "1", "engine.ema_decay": "0.9", "aug.reprob": "0.25"})
    one, two = tmp_path / "one", tmp_path / "two"
    single = _sdt(_train_args(one, overrides))
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "sdt.cli", *_train_args(two, overrides)], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"2 processes vs 1: max |weight difference| {worst:.3g}")
    assert worst < 1e-5, worst
    va, vb = _val_records(one)[-1], _val_records(two)[-1]
    assert va["top1"] == vb["top1"] and va["loss"] == pytest.approx(vb["loss"], abs=1e-5)
    assert "2 processes" in (two / "train.log").read_text()


_VIT = {"model.name": "vit_tiny_patch16_224", "model.drop_path_rate": "null",
        "model.kwargs": "{img_size: 16, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 1}"}


def test_gradient_accumulation_matches_the_full_batch(fake_fmnist: Path, tmp_path: Path):
    # batch 64 in one pass vs 4 micro-batches of 16 (a LayerNorm model: no batch statistics); 2 epochs x 2 steps
    overrides = {**_VIT, "engine.batch_size": "64", "engine.ema_decay": "0.9", "aug.reprob": "0.25", "engine.clip_grad": "1.0"}
    full, accum = tmp_path / "full", tmp_path / "accum"
    assert main(_train_args(full, tiny_overrides(fake_fmnist, **overrides))) == 0
    assert main(_train_args(accum, tiny_overrides(fake_fmnist, **overrides, **{"engine.grad_accum_steps": "4"}))) == 0
    a, b = _final_weights(full), _final_weights(accum)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    assert json.loads((accum / "summary.json").read_text())["global_step"] == 4  # optimizer steps, not micro-batches
    assert [r["step"] for r in _val_records(accum)] == [2, 4]


def test_resume_with_gradient_accumulation_is_bitwise_identical(fake_fmnist: Path, tmp_path: Path):
    # Checkpoints are written at optimizer-step boundaries only, so a resume never starts mid-accumulation.
    overrides = tiny_overrides(fake_fmnist, **{"engine.grad_accum_steps": "2", "engine.ema_decay": "0.9",
                                               "model.drop_path_rate": "0.1", "engine.keep_checkpoints": "50"})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(_train_args(reference, overrides)) == 0
    shutil.copytree(reference, resumed)
    for later in checkpoint_dirs(resumed)[1:]:  # back to step 3 of 10, mid-epoch 1, as if killed there
        shutil.rmtree(later)
    for name in ("best.safetensors", "summary.json", "report.md"):
        (resumed / name).unlink()
    assert [p.name for p in checkpoint_dirs(resumed)] == ["step-00000003"]
    assert main(["train", "--output", str(resumed), "--resume"]) == 0
    a, b = _final_weights(reference), _final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert _val_records(reference) == _val_records(resumed)


@pytest.mark.parametrize("change, message", [
    (dict(sync_bn=True), "SyncBatchNorm is CUDA-only"),
    (dict(batch_size=15), "must be divisible by the number of processes"),
    (dict(amp="fp16"), "fp16 needs a GPU"),
    (dict(batch_size=1000), "smaller than one batch"),
])
def test_engine_settings_that_cannot_work_are_config_errors(change, message):
    cfg = dataclasses.replace(EngineConfig(batch_size=16), **change)
    with pytest.raises(ConfigError, match=message):
        check_engine_config(cfg, DistInfo(rank=0, world_size=2), num_train=100)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_on_a_cpu_without_bf16_instructions_warns(monkeypatch, native):
    """On an AVX2-only CPU torch emulates bf16 and sdt_h_tiny inference ran 12x slower than float32
    (benchmarks/bench_bf16.py, docs/benchmarks.md): a user asking for bf16 to go faster must hear it."""
    import warnings

    import sdt.engine.config

    monkeypatch.setattr(sdt.engine.config, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_engine_config(EngineConfig(batch_size=16, amp="bf16"), DistInfo(rank=0, world_size=1), num_train=100)
        check_engine_config(EngineConfig(batch_size=16, amp="none"), DistInfo(rank=0, world_size=1), num_train=100)
    messages = [str(w.message) for w in caught]
    if native:
        assert messages == [], messages
    else:
        assert len(messages) == 1 and "use engine.amp=none on this machine" in messages[0], messages


def test_resume_uses_the_saved_config_and_warns_about_a_different_one(fake_fmnist: Path, tmp_path: Path):
    """A library caller's cfg is not silently replaced on resume: the same config (or None) resumes
    quietly, one that sets other values gets a warning naming the keys, and the saved config wins."""
    import warnings

    from sdt.engine import load_config
    train = Classify().train

    cfg = load_config(TrainConfig, "quick", tiny_overrides(fake_fmnist, **{"engine.epochs": "1"}))
    run = tmp_path / "run"
    steps = train(cfg, str(run))["global_step"]
    assert (cfg.model.num_classes, cfg.model.in_chans) == (None, None)  # resolved into the run's copy, not the caller's
    saved = load_config(TrainConfig, str(run / "config.yaml"))
    assert (saved.model.num_classes, saved.model.in_chans) == (10, 1)  # which config.yaml keeps
    unresolved = load_config(TrainConfig, "quick", tiny_overrides(fake_fmnist, **{"engine.epochs": "1"}))
    for same in (None, load_config(TrainConfig, str(run / "config.yaml")), unresolved):  # unset num_classes: no change
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert train(same, str(run), resume="auto")["global_step"] == steps
        assert not [w for w in caught if "saved config.yaml" in str(w.message)]
    changed = load_config(TrainConfig, "quick", tiny_overrides(fake_fmnist, **{"engine.epochs": "2", "engine.lr": "0.5"}))
    with pytest.warns(UserWarning, match=r"saved config.yaml.*engine.epochs, engine.lr, which are ignored") as record:
        assert train(changed, str(run), resume="auto")["global_step"] == steps  # still the saved 1 epoch
    assert [w.filename for w in record if "saved config.yaml" in str(w.message)] == [__file__]


def test_a_task_of_ones_own_needs_only_its_methods(tmp_path: Path):
    """A further task is a Task subclass: the run sequence does the run folder, the counts, training,
    finish, summary.json and report.md, and knows no task by name."""
    from torch import nn

    from sdt.engine import Built
    from sdt.tasks import Task
    from sdt.tasks.classify import classification_counts, summarize

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, n: int):
            self.x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(n))
            self.y = (self.x.mean((1, 2, 3)) > 0).long()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int):
            return self.x[i], int(self.y[i])

    class Toy(Task):
        config_class, metric, report_title = TrainConfig, "top1", "Toy report"
        finished: list = []

        def build(self, cfg, dist_info):
            self.cfg, self.dist = cfg, dist_info
            model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
            return Built(cfg, model, Pairs(64), Pairs(32), "linear", "pairs", (1, 4, 4), summary={"model": "linear"},
                         workers=0)

        def loss(self, model, batch):
            return nn.functional.cross_entropy(model(batch.images), batch.targets)

        def evaluate(self, model, loader, dist_info):
            return summarize(classification_counts(model, loader, 2, dist_info))

        def finish(self, trainer, summary):
            self.finished.append(summary["global_step"])

        def report_rows(self, s):
            return [self.best_row(s, "top-1", unit="%")]

        def headline(self, s):
            return "toy done"

    cfg = TrainConfig(engine=EngineConfig(epochs=2, batch_size=16, warmup_epochs=0, log_every_steps=1, threads=1))
    task = Toy()
    summary = task.train(cfg, str(tmp_path / "run"))
    assert task.finished == [8] and summary["global_step"] == 8
    assert (summary["params"], summary["flops"], summary["input_size"]) == (34, 32, 4)
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# Toy report") and "| best val top-1 |" in report and "![curves](curves.png)" in report
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == "linear"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "model linear: 0.00M parameters" in log and "data pairs: 64 train / 32 val images" in log
