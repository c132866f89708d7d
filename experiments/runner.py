"""The studies' shared run step: one cell of a grid in its own ``sdt`` process (skip it when finished,
resume it when killed, start it otherwise), the ``--until`` deadline, and the statistics the
reports share. The runners import it as a package module: ``python -m experiments.<study>``.
"""
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from sdt.engine.checkpoints import checkpoint_dirs


def deadline(hhmm: str) -> float:
    """The next local time ``HH:MM`` as a Unix time (tomorrow when it has passed today): ``--until``."""
    hour, _, minute = hhmm.partition(":")
    if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
        raise SystemExit(f"--until {hhmm!r}: expected a local time HH:MM, e.g. --until 21:20")
    now = time.localtime()
    until = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, int(hour), int(minute), 0, 0, 0, -1))
    return until + 86400 if until < time.time() else until


def run_or_resume(folder: Path, new_run_args: List[str], command: str = "train", threads: Optional[int] = None,
                  until: Optional[float] = None) -> None:
    """Run one cell of a study in ``folder`` with ``sdt <command>`` in its own process: skip it when
    finished, resume it from its last checkpoint when killed, else start it with ``new_run_args``
    (``--recipe``, ``-o``). ``threads`` sets OMP_NUM_THREADS for it; past ``until`` (a Unix time) an
    unfinished cell is left for the next sitting. A failed run raises
    ``subprocess.CalledProcessError`` (its console log is ``<folder>.log``)."""
    if (folder / "summary.json").is_file():
        print(f"[skip] {folder} is finished", flush=True)
        return
    if until is not None and time.time() > until:
        print(f"[later] {folder}: past --until, left for the next sitting", flush=True)
        return
    if folder.exists() and not checkpoint_dirs(folder):
        shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to resume
    if folder.exists():  # a resumed run keeps the config it saved
        cmd = [sys.executable, "-m", "sdt.cli", command, "--output", str(folder), "--resume"]
        print(f"[resume] {folder}", flush=True)
    else:
        cmd = [sys.executable, "-m", "sdt.cli", command, "--output", str(folder), *new_run_args]
        print(f"[{command}] {folder}", flush=True)
    log = folder.parent / f"{folder.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "a") as f:  # several runs at once: each writes its own console log
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"[done] {folder}", flush=True)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
