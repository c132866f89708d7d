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


def test_vit_study_long_regime_grid_is_seed_major_and_passes_the_gate_lr(tmp_path: Path, calls):
    """Issue 33's regime: 6k images x 20 epochs in 6k-e20/, vit/fixed/cag/cag_lr10 per seed, and cag_lr10's
    engine.lr_scale override reaches the sdt command."""
    from experiments import vit_study

    runs = vit_study.grid(["long"])
    assert runs[:4] == [("long", v, 0) for v in ("vit", "fixed", "cag", "cag_lr10")] and len(runs) == 12
    assert vit_study.grid(["long"], seeds=2, extra_seeds=1)[-1] == ("long", "cag", 1)
    vit_study.train(tmp_path, "long", "cag_lr10", 1, [])
    cmd = calls[0]["cmd"]
    assert str(tmp_path / "6k-e20" / "cag_lr10-s1") in cmd
    for override in ('engine.lr_scale={"*gate*": 10}', "data.train_subset=6000", "engine.epochs=20", "engine.seed=1",
                     "model.kwargs.decay=cag"):
        assert cmd[cmd.index(override) - 1] == "-o", override


def test_vit_study_curves_plot_accuracy_and_gate_drift_of_finished_runs(tmp_path: Path):
    """curves.png for every finished run, gate_drift.png and the drift table for the gated ones; a run
    without summary.json (still training) is left out."""
    from experiments import vit_study

    group = tmp_path / "6k-e20"
    for name, drift in (("fixed-s0", None), ("cag-s0", 0.1), ("cag-s1", 0.3), ("cag_lr10-s0", None)):
        run = group / name
        run.mkdir(parents=True)
        rows = []
        for step in (93, 186):
            row = {"kind": "val", "step": step, "epoch": step // 93, "top1": 50.0 + step / 10}
            if drift is not None:
                row.update({"gate_drift": drift, "gate_drift.0": drift, "gate_drift.1": 2 * drift})
            rows.append(row)
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        if name != "cag_lr10-s0":
            (run / "summary.json").write_text("{}")
    lines = vit_study.curves(group)
    assert (group / "curves.png").stat().st_size > 1000 and (group / "gate_drift.png").stat().st_size > 1000
    table = "\n".join(lines)
    assert "| `cag` | 2 | 0.200 ± 0.141 | 0.400 ± 0.283 |" in table and "cag_lr10" not in table and "fixed" not in table


def test_generation_samples_with_the_current_sdt_sample_flags(tmp_path: Path, monkeypatch, capsys):
    """The study's ``sdt sample`` call parses without a deprecation note (it used the old ``--out``)."""
    from experiments import generation
    from sdt.cli import build_parser

    recorded: List[List[str]] = []
    monkeypatch.setattr(generation.subprocess, "run", lambda cmd, check: recorded.append(cmd))
    generation.sample(tmp_path, "cag", per_class=2, threads=1)
    (cmd,) = recorded
    assert cmd[1:4] == ["-m", "sdt.cli", "sample"]
    args = build_parser().parse_args(cmd[3:])
    assert "deprecated" not in capsys.readouterr().err
    assert Path(args.output) == tmp_path / "cag" / "samples-20"
