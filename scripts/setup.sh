#!/usr/bin/env bash
# Set up everything sdt needs on a fresh machine: Fashion-MNIST and g++ (Debian), PyTorch, sdt itself.
# Safe to rerun: each step is skipped or a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        echo "note: Fashion-MNIST is missing; install it with 'sudo apt-get install dataset-fashion-mnist'" >&2
    fi
fi
# A C++ compiler builds the fused CPU attention kernel on first use (sdt/backends/fused.py).
if ! command -v g++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q g++ >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q g++ >/dev/null; }
    else
        echo "note: no C++ compiler; the fused CPU kernel falls back to a slower loop ('sudo apt-get install g++')" >&2
    fi
fi
# torch/torchvision are pinned to the builds this machine serves from disk (see README).
"$PYTHON" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
