#!/usr/bin/env bash
# Set up sdt on a fresh machine: Fashion-MNIST and g++ (Debian, when root), a Python environment, PyTorch
# (only where it is missing or too old), sdt itself from this checkout, and the extras named as arguments.
#
#   bash scripts/setup.sh              # what `sdt train` needs
#   bash scripts/setup.sh test         # + the [test] extra (pytest, ruff, and every other extra the tests use)
#   bash scripts/setup.sh export viz   # any of: export viz fid fid-inception dense test
#
# The environment (scripts/in-env runs commands in the same one):
#   - the active virtual environment ($VIRTUAL_ENV) or conda environment other than base ($CONDA_PREFIX);
#   - else this checkout's .venv, created with $PYTHON (default python3) if it is not there. A venv is never
#     "externally managed" (PEP 668), so this works on Debian 12 / Ubuntu 24.04's own Python too.
# PyTorch: a torch that meets pyproject.toml's lower bound is kept as it is (CUDA, ROCm, conda or CPU build),
# and pip is held to that version while it installs the rest. Otherwise the pinned pair below is installed:
# the builds this project's reference machine serves from its own disk.
# Safe to rerun: each step is skipped or a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN=(torch==2.14.1 torchvision==0.29.1)
EXTRAS_KNOWN=" export viz fid fid-inception dense test "

extras=""
for extra in "$@"; do
    case "$EXTRAS_KNOWN" in
        *" $extra "*) extras=${extras:+$extras,}$extra ;;
        *) echo "error: unknown extra '$extra'; choose from: $(echo $EXTRAS_KNOWN)" >&2; exit 2 ;;
    esac
done

as_root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {  # apt_install PACKAGE...: quietly, with one 'apt-get update' retry for a stale package list
    apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if as_root_apt; then
        apt_install dataset-fashion-mnist
    else
        echo "note: Fashion-MNIST is missing: 'sudo apt-get install dataset-fashion-mnist', or without root put its" \
             "four IDX files in a folder and pass --data-dir FOLDER (README: 'Fashion-MNIST without root')" >&2
    fi
fi
# A C++ compiler builds the fused CPU attention kernel on first use (sdt/backends/fused.py).
if ! command -v g++ >/dev/null; then
    if as_root_apt; then
        apt_install g++
    else
        echo "note: no C++ compiler; the fused CPU kernel falls back to a slower loop ('sudo apt-get install g++')" >&2
    fi
fi

# The Python environment.
if [ -n "${VIRTUAL_ENV:-}" ]; then
    env_dir=$VIRTUAL_ENV
    echo "setup: installing into the active virtual environment $env_dir"
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != base ]; then
    env_dir=$CONDA_PREFIX
    echo "setup: installing into the active conda environment $env_dir"
else
    env_dir=$PWD/.venv
    if [ ! -x "$env_dir/bin/python" ]; then
        base=${PYTHON:-python3}
        "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
            || { echo "error: sdt needs Python 3.10 or newer; '$base' is not (set PYTHON=python3.X)" >&2; exit 1; }
        if ! "$base" -m venv "$env_dir" >/dev/null 2>&1; then
            rm -rf "$env_dir"
            if as_root_apt; then apt_install python3-venv; fi
            "$base" -m venv "$env_dir" >/dev/null 2>&1 || { rm -rf "$env_dir"; echo "error: '$base -m venv' failed:" \
                "install Debian's python3-venv ('sudo apt-get install python3-venv') or activate a virtual environment" >&2; exit 1; }
        fi
        echo "setup: created the virtual environment .venv (activate it with 'source .venv/bin/activate'," \
             "or run commands through scripts/in-env)"
    else
        echo "setup: installing into .venv (no active virtual environment)"
    fi
fi
PY=$env_dir/bin/python
[ -x "$PY" ] || { echo "error: the environment $env_dir has no bin/python; deactivate it or recreate it" >&2; exit 1; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

held=$(mktemp)
trap 'rm -f "$held"' EXIT
decision=$("$PY" scripts/check_torch.py)
case "$decision" in
    keep\ *)
        echo "setup: keeping torch ${decision#keep }"
        echo "torch==${decision#keep }" >"$held" ;;
    install\ *)
        echo "setup: ${decision#install }: installing ${TORCH_PIN[*]}"
        pip_install "${TORCH_PIN[@]}"
        printf '%s\n' "${TORCH_PIN[@]}" >"$held" ;;
    *) echo "error: scripts/check_torch.py said '$decision'" >&2; exit 1 ;;
esac
pip_install -c "$held" -e ".${extras:+[$extras]}"
echo "setup: done; sdt ${extras:+with [$extras] }is in $env_dir"
