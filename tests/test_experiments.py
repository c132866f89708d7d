"""The studies' shared run step (experiments/runner.py): skip, resume, start, --until.

experiments/ is a package the runners are run from (``python -m experiments.<study>``); they import
the runner as these tests do.
``subprocess.run`` is replaced by a recorder, so these tests check which ``sdt`` command each state of
a run folder leads to, not the training itself (tests/tasks/test_classify.py covers resume).
"""
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from sdt.engine.checkpoints import TEMP_CHECKPOINT_PREFIX, checkpoint_dirs

from experiments import runner


@pytest.fixture
def calls(monkeypatch) -> List[Dict]:
    recorded: List[Dict] = []

    def fake_run(cmd, check, stdout, stderr, env):
        recorded.append({"cmd": cmd, "env": env, "log": Path(stdout.name)})

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    return recorded


def test_a_new_cell_starts_with_its_arguments_and_logs_beside_its_folder(tmp_path: Path, calls):
    folder = tmp_path / "grid" / "cag-s0"
    runner.run_or_resume(folder, ["--recipe", "ablation", "-o", "engine.seed=0"], command="gen-train", threads=1)
    (call,) = calls
    assert call["cmd"][1:] == ["-m", "sdt.cli", "gen-train", "--output", str(folder), "--recipe", "ablation",
                               "-o", "engine.seed=0"]
    assert call["env"]["OMP_NUM_THREADS"] == "1"
    assert call["log"] == tmp_path / "grid" / "cag-s0.log"


def test_a_finished_cell_is_skipped(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    runner.run_or_resume(folder, ["--recipe", "ablation"])
    assert calls == []


def test_a_killed_cell_resumes_with_its_saved_config(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    (folder / "checkpoints" / "step-00000200").mkdir(parents=True)
    runner.run_or_resume(folder, ["--recipe", "ablation", "-o", "engine.seed=0"])
    (call,) = calls
    assert call["cmd"][3:] == ["train", "--output", str(folder), "--resume"]
    assert call["env"] is None  # no threads given: the child inherits the environment


def test_a_cell_killed_before_its_first_checkpoint_starts_again(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    (folder / "checkpoints" / f"{TEMP_CHECKPOINT_PREFIX}00000200-123").mkdir(parents=True)  # a killed save
    (folder / "train.log").write_text("killed")
    runner.run_or_resume(folder, ["--recipe", "ablation"])
    (call,) = calls
    assert "--resume" not in call["cmd"] and call["cmd"][-2:] == ["--recipe", "ablation"]
    assert not (folder / "train.log").exists()


def test_past_until_nothing_starts_or_is_removed(tmp_path: Path, calls):
    fresh, killed = tmp_path / "a-s0", tmp_path / "b-s0"
    (killed / "checkpoints" / "step-00000200").mkdir(parents=True)
    for folder in (fresh, killed):
        runner.run_or_resume(folder, ["--recipe", "ablation"], until=time.time() - 1)
    assert calls == [] and not fresh.exists() and checkpoint_dirs(killed)


@pytest.mark.parametrize("text", ["25:00", "9", "12:60", "noon", "-1:30"])
def test_until_rejects_a_bad_time(text: str):
    with pytest.raises(SystemExit, match="expected a local time HH:MM"):
        runner.deadline(text)


def test_until_is_the_next_occurrence_of_that_time():
    now = time.time()
    soon = time.strftime("%H:%M", time.localtime(now + 3600))
    assert 0 < runner.deadline(soon) - now <= 3600
    passed = time.strftime("%H:%M", time.localtime(now - 3600))
    assert 22 * 3600 < runner.deadline(passed) - now <= 23 * 3600 + 60


def _scored_run(out: Path, kind: str, extractor: str, fid: float) -> None:
    """A finished generation run folder with its scores under ``extractor``, as generation.py leaves it."""
    folder = out / kind
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {name: dit_n_2, objective: flow}\n"
                                        "sample: {sampler: heun, steps: 10, cfg_scale: 1.5}\n")
    (folder / "summary.json").write_text(json.dumps({"params": 1000, "global_step": 10,
                                                     "final_val": {"loss": 0.3, "ema_loss": 0.29}}))
    (folder / f"scores-10000-{extractor}.json").write_text(json.dumps(
        {"fid": fid, "fid_text": f"FID {fid} ({extractor})", "fid_halves": [fid + 1, fid + 2], "conditional_accuracy": 0.9, "extractor": extractor}))


def test_generation_report_is_per_extractor(tmp_path: Path, monkeypatch, capsys):
    from experiments import generation

    tag = generation.DEFAULT_EXTRACTOR
    _scored_run(tmp_path, "none", tag, 5.25)
    _scored_run(tmp_path, "cag", "some_other.extractor", 9.75)  # scored with another extractor only: not in this table
    (tmp_path / f"scores-real-10000-{tag}.json").write_text(json.dumps(
        {"fid": 1.5, "fid_text": "FID 1.5", "conditional_accuracy": 0.95, "extractor": tag}))
    monkeypatch.setattr(sys, "argv", ["generation.py", "--out", str(tmp_path), "--kinds", "none", "cag", "--report-only"])
    generation.main()
    table = (tmp_path / f"results-{tag}.md").read_text()
    assert "| `none` | dit_n_2 |" in table and "| 5.25 | 6.25 / 7.25 |" in table and "heun 10 steps, cfg 1.5" in table
    assert "`cag`" not in table and "9.75" not in table
    assert json.loads((tmp_path / f"results-{tag}.json").read_text())["extractor"] == tag
    assert not (tmp_path / "results.md").exists()


def test_generation_rejects_an_extractor_without_local_weights_before_training(tmp_path: Path, monkeypatch, calls):
    from experiments import generation

    monkeypatch.setattr(sys, "argv", ["generation.py", "--out", str(tmp_path), "--extractor", "resnet18.a1_in1k"])
    with pytest.raises(SystemExit, match="--extractor 'resnet18.a1_in1k': extractor 'resnet18.a1_in1k' has no local weights"):
        generation.main()
    assert calls == [] and not any(tmp_path.iterdir())
