#!/usr/bin/env bash
# Creates bench/.venv with the anchors (PyTorch CPU, numpy, pillow; ONNX Runtime; FAISS, hnswlib and usearch for
# bench/ann.sh). Never part of CI; takes a while.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.15.0" numpy pillow faiss-cpu
# inference anchors (bench/embed_anchors.py): ONNX Runtime and the exporter it needs
.venv/bin/pip install -q "onnxruntime==1.32.0" "onnx==1.23.2" "onnxscript==0.7.2"
# ANN anchors (bench/ann.sh), the versions measured in RESULTS.md §12
.venv/bin/pip install -q "faiss-cpu==1.15.1" "hnswlib==0.8.0" "usearch==2.26.6"
.venv/bin/python -c "import torch; print('torch', torch.__version__)"
.venv/bin/python -c "import faiss, hnswlib, usearch, onnxruntime; print('faiss', faiss.__version__, 'usearch', usearch.__version__, 'onnxruntime', onnxruntime.__version__)"
