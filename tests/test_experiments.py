"""The studies' shared run step (experiments/ablation.py): skip, resume, start, --until.

experiments/ is not a package; the runners import ablation the same way (its folder on sys.path).
``subprocess.run`` is replaced by a recorder, so these tests check which ``sdt`` command each state of
a run folder leads to, not the training itself (tests/test_train.py covers resume).
"""
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from sdt.checkpoints import TEMP_CHECKPOINT_PREFIX, checkpoint_dirs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ablation  # noqa: E402


@pytest.fixture
def calls(monkeypatch) -> List[Dict]:
    recorded: List[Dict] = []

    def fake_run(cmd, check, stdout, stderr, env):
        recorded.append({"cmd": cmd, "env": env, "log": Path(stdout.name)})

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    return recorded


def test_a_new_cell_starts_with_its_arguments_and_logs_beside_its_folder(tmp_path: Path, calls):
    folder = tmp_path / "grid" / "cag-s0"
    ablation.run_or_resume(folder, ["--recipe", "ablation", "-o", "engine.seed=0"], command="gen-train", threads=1)
    (call,) = calls
    assert call["cmd"][1:] == ["-m", "sdt.cli", "gen-train", "--output", str(folder), "--recipe", "ablation",
                               "-o", "engine.seed=0"]
    assert call["env"]["OMP_NUM_THREADS"] == "1"
    assert call["log"] == tmp_path / "grid" / "cag-s0.log"


def test_a_finished_cell_is_skipped(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    ablation.run_or_resume(folder, ["--recipe", "ablation"])
    assert calls == []


def test_a_killed_cell_resumes_with_its_saved_config(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    (folder / "checkpoints" / "step-00000200").mkdir(parents=True)
    ablation.run_or_resume(folder, ["--recipe", "ablation", "-o", "engine.seed=0"])
    (call,) = calls
    assert call["cmd"][3:] == ["train", "--output", str(folder), "--resume"]
    assert call["env"] is None  # no threads given: the child inherits the environment


def test_a_cell_killed_before_its_first_checkpoint_starts_again(tmp_path: Path, calls):
    folder = tmp_path / "cag-s0"
    (folder / "checkpoints" / f"{TEMP_CHECKPOINT_PREFIX}00000200-123").mkdir(parents=True)  # a killed save
    (folder / "train.log").write_text("killed")
    ablation.run_or_resume(folder, ["--recipe", "ablation"])
    (call,) = calls
    assert "--resume" not in call["cmd"] and call["cmd"][-2:] == ["--recipe", "ablation"]
    assert not (folder / "train.log").exists()


def test_past_until_nothing_starts_or_is_removed(tmp_path: Path, calls):
    fresh, killed = tmp_path / "a-s0", tmp_path / "b-s0"
    (killed / "checkpoints" / "step-00000200").mkdir(parents=True)
    for folder in (fresh, killed):
        ablation.run_or_resume(folder, ["--recipe", "ablation"], until=time.time() - 1)
    assert calls == [] and not fresh.exists() and checkpoint_dirs(killed)


@pytest.mark.parametrize("text", ["25:00", "9", "12:60", "noon", "-1:30"])
def test_until_rejects_a_bad_time(text: str):
    with pytest.raises(SystemExit, match="expected a local time HH:MM"):
        ablation.deadline(text)


def test_until_is_the_next_occurrence_of_that_time():
    now = time.time()
    soon = time.strftime("%H:%M", time.localtime(now + 3600))
    assert 0 < ablation.deadline(soon) - now <= 3600
    passed = time.strftime("%H:%M", time.localtime(now - 3600))
    assert 22 * 3600 < ablation.deadline(passed) - now <= 23 * 3600 + 60
