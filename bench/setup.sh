#!/usr/bin/env bash
# Creates bench/.venv with the anchors (PyTorch CPU, numpy, pillow). Never part of CI; takes a while.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.15.0" numpy pillow faiss-cpu
.venv/bin/python -c "import torch; print('torch', torch.__version__)"
