"""The run-folder format across the layout change: a run killed by the code before it resumes with
today's code and ends where a run started today ends, up to float rounding (tests/fixtures/README-run_v0.md)."""
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from sdt.cli import main
from sdt.engine import load_config
from sdt.engine.checkpoints import checkpoint_dirs
from sdt.tasks import Classify, TrainConfig

OLD_RUN = Path(__file__).parents[1] / "fixtures" / "run_v0"


def _final(run: Path) -> dict:
    last = checkpoint_dirs(run)[-1]
    return {**load_file(str(last / "model.safetensors")), **{f"ema.{k}": v for k, v in load_file(str(last / "ema.safetensors")).items()}}


def _val_records(run: Path) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]


def test_a_run_folder_from_before_the_layout_resumes_and_matches_a_new_run(fake_fmnist: Path, tmp_path: Path):
    old = tmp_path / "old"
    shutil.copytree(OLD_RUN, old)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    saved["data"]["data_dir"] = str(fake_fmnist)  # the same fake data, at this test's path
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    assert main(["train", "--output", str(old), "--resume"]) == 0
    assert [p.name for p in checkpoint_dirs(old)] == ["step-00000018", "step-00000020"]
    assert json.loads((old / "summary.json").read_text())["global_step"] == 20

    new = tmp_path / "new"
    Classify().train(load_config(TrainConfig, str(old / "config.yaml")), str(new))
    # Not bitwise: the fused projections and kernels of issue 30 round differently from the code that wrote
    # the fixture's first 18 steps (validation losses differ by ~2e-6, AdamW turns that into up to 6e-4 on
    # weights whose gradients are near zero). A resume that lost state (optimizer, EMA, schedule, data order)
    # is caught: an EMA or optimizer state reset at the fixture's step 18 fails this test (checked by hand).
    a, b = _final(old), _final(new)
    assert a.keys() == b.keys()
    far = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=2e-3)]
    assert not far, far[:5]
    old_val, new_val = _val_records(old), _val_records(new)
    assert [(r["step"], r["epoch"], r["top1"], r["top5"], r["ema_top1"], r["ema_top5"]) for r in old_val] \
        == [(r["step"], r["epoch"], r["top1"], r["top5"], r["ema_top1"], r["ema_top5"]) for r in new_val]
    for r_old, r_new in zip(old_val, new_val):
        assert abs(r_old["loss"] - r_new["loss"]) < 2e-5 and abs(r_old["ema_loss"] - r_new["ema_loss"]) < 2e-5, (r_old, r_new)
    written = yaml.safe_load((new / "config.yaml").read_text())
    added = {"model": {"initial_checkpoint": None}, "engine": {"layer_decay": None, "lr_scale": {}}}  # keys newer than the fixture, off
    for section, keys in added.items():
        for key, default in keys.items():
            assert written[section].pop(key) == default
    assert written == saved  # a new run saves the same config.yaml
