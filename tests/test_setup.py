"""scripts/setup.sh's decisions, without installing anything: which torch it keeps, which extras it
accepts, and which environment scripts/in-env runs commands in."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_torch  # noqa: E402

sys.path.remove(str(REPO / "scripts"))
SETUP = (REPO / "scripts" / "setup.sh").read_text()
PYPROJECT = (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("installed, minimum, verdict", [
    (None, "2.14", "install"),
    ("2.3.1", "2.14", "install"),
    ("2.13.0+cpu", "2.14", "install"),
    ("2.14.0", "2.14.1", "install"),
    ("2.14.0a0+git1234", "2.14.1", "install"),
    ("2.14", "2.14.0", "keep"),
    ("2.14.0", "2.14", "keep"),
    ("2.14.1", "2.14", "keep"),
    ("2.14.1+cu128", "2.14", "keep"),
    ("2.15.0a0+git1234", "2.14", "keep"),  # NVIDIA container builds
    ("10.0.0", "2.14", "keep"),             # numbers, not strings: "10" > "2"
])
def test_torch_is_installed_only_where_missing_or_older_than_the_minimum(installed, minimum, verdict):
    decision = check_torch.decide(installed, minimum)
    assert decision.split()[0] == verdict
    if verdict == "keep":
        assert decision == f"keep {installed}"  # setup.sh holds pip to exactly this version


def test_the_minimum_is_read_from_pyproject_dependencies(tmp_path: Path):
    assert check_torch.minimum_torch() == re.search(r'"torch>=([0-9.]+)', PYPROJECT).group(1)
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\ndependencies = [\n    "timm>=1",\n    "torch >= 2.9.1",  # comment\n]\n'
                    '[project.optional-dependencies]\nx = ["torch>=1.0"]\n')
    assert check_torch.minimum_torch(fake) == "2.9.1"
    fake.write_text('[project]\ndependencies = ["timm>=1"]\n[project.optional-dependencies]\nx = ["torch>=1.0"]\n')
    with pytest.raises(ValueError, match="no 'torch>=X'"):
        check_torch.minimum_torch(fake)


def test_the_command_line_prints_one_line(tmp_path: Path):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "check_torch.py"), *args],
                              capture_output=True, text=True, timeout=60)
    minimum = check_torch.minimum_torch()
    assert run("--installed", "none").stdout == "install torch is missing\n"
    old = run("--installed", "2.0.1")
    assert old.stdout == f"install torch 2.0.1 is older than {minimum}, the oldest sdt supports\n"
    assert run("--installed", "99.1+rocm7").stdout == "keep 99.1+rocm7\n"
    from importlib import metadata
    assert run().stdout == check_torch.decide(metadata.version("torch"), minimum) + "\n"  # this Python's torch
    (tmp_path / "pyproject.toml").write_text("[project]\ndependencies = []\n")
    broken = run("--pyproject", str(tmp_path / "pyproject.toml"))
    assert broken.returncode == 2 and broken.stderr.startswith("error: ") and broken.stdout == ""


def test_the_pinned_torch_meets_the_stated_range():
    pins = dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)", re.search(r"^TORCH_PIN=\((.*)\)$", SETUP, re.M).group(1)))
    assert set(pins) == {"torch", "torchvision"}
    assert check_torch.decide(pins["torch"], check_torch.minimum_torch()).startswith("keep")
    # the lower bound is one this project has run its tests on: the pin (README, "Supported PyTorch")
    assert check_torch.release(check_torch.minimum_torch()) <= check_torch.release(pins["torch"])


def test_setup_accepts_exactly_the_extras_pyproject_defines():
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", PYPROJECT, re.M | re.S).group(1)
    extras = set(re.findall(r"^([A-Za-z][\w-]*)\s*=", section, re.M))
    known = re.search(r'^EXTRAS_KNOWN=" (.*) "$', SETUP, re.M).group(1).split()
    assert set(known) == extras
    # an unknown extra is refused before anything is installed (it is checked first)
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "test", "tests"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"error: unknown extra 'tests'; choose from: {' '.join(known)}\n"


def _venv(folder: Path) -> Path:
    """A real (pip-less) virtual environment: bin/python and pyvenv.cfg are all scripts/in-env looks at."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    return folder


def _in_env(checkout: Path, *args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV")}
    return subprocess.run([str(checkout / "scripts" / "in-env"), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of scripts/in-env in a folder of its own, so that its .venv is a temporary one."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "in-env", tmp_path / "repo" / "scripts" / "in-env")
    return tmp_path / "repo"


def test_in_env_uses_the_active_virtual_environment_first(checkout: Path, tmp_path: Path):
    active = _venv(tmp_path / "active")
    _venv(checkout / ".venv")
    result = _in_env(checkout, "python", "-c", "import os, shutil, sys; print(shutil.which('python')); print(os.environ['VIRTUAL_ENV']); print(sys.prefix)",
                     VIRTUAL_ENV=str(active))
    assert result.stdout.splitlines() == [str(active / "bin" / "python"), str(active), str(active)]
    assert _in_env(checkout, VIRTUAL_ENV=str(active)).stdout == f"{active}\n"


def test_in_env_uses_a_conda_environment_but_not_base(checkout: Path, tmp_path: Path):
    conda = _venv(tmp_path / "conda")
    _venv(checkout / ".venv")
    assert _in_env(checkout, CONDA_PREFIX=str(conda), CONDA_DEFAULT_ENV="work").stdout == f"{conda}\n"
    assert _in_env(checkout, CONDA_PREFIX=str(conda), CONDA_DEFAULT_ENV="base").stdout == f"{checkout / '.venv'}\n"


def test_in_env_falls_back_to_the_checkouts_venv(checkout: Path):
    missing = _in_env(checkout, "python", "-V")
    assert missing.returncode == 1
    assert missing.stderr == f"error: no Python environment at {checkout / '.venv'}: run 'bash scripts/setup.sh' first\n"
    venv = _venv(checkout / ".venv")
    result = _in_env(checkout, "python", "-c", "import os, shutil, sys; print(shutil.which('python')); print(os.environ['VIRTUAL_ENV']); print(sys.prefix)")
    assert result.stdout.splitlines() == [str(venv / "bin" / "python"), str(venv), str(venv)]
