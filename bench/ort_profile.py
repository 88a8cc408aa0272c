"""ONNX Runtime's own per-node profile of the Lite0 pooled-features graph (issue 13): where its time
goes, to set beside `deeprank-bench layers`.

    python bench/ort_profile.py REF_PY WEIGHTS SIZE [BATCH] [RUNS]

Exports the reference network's pooled features (opset 17, as bench/embed_anchors.py does), runs
RUNS (default 5) batches of BATCH (default 64) random images after one warm-up with
`enable_profiling`, THREADS (2) intra-op threads, ORT_ENABLE_ALL, and prints per-kind totals (the
fused node's op type: FusedConv, NchwcConv, ...) and the per-block sum in ms per image.
"""
import collections
import importlib.util
import json
import os
import re
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch

ref, weights, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
bs = int(sys.argv[4]) if len(sys.argv) > 4 else 64
runs = int(sys.argv[5]) if len(sys.argv) > 5 else 5
threads = int(os.environ.get("THREADS", "2"))
spec = importlib.util.spec_from_file_location("torch_reference", ref)
tr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tr)
m = tr.load(weights).eval()


class Pooled(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.pooled(x)


d = tempfile.mkdtemp()
path = os.path.join(d, "lite0.onnx")
torch.onnx.export(Pooled(m), (torch.zeros(bs, 3, size, size),), path, input_names=["x"],
                  output_names=["f"], dynamic_axes={"x": {0: "n"}, "f": {0: "n"}}, opset_version=17,
                  dynamo=False)
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.enable_profiling = True
so.profile_file_prefix = os.path.join(d, "prof")
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((bs, 3, size, size), dtype=np.float32)
sess.run(None, {"x": x})
for _ in range(runs):
    sess.run(None, {"x": x})
events = json.load(open(sess.end_profiling()))
nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
# Drop the warm-up run: the first len(nodes)/(runs+1) node events.
per_run = len(nodes) // (runs + 1)
nodes = nodes[per_run:]
images = bs * runs
by_kind = collections.defaultdict(float)
by_block = collections.defaultdict(float)
if os.environ.get("NAMES"):
    print("\n".join(e["name"] for e in nodes[:per_run]))
for e in nodes:
    us = e["dur"]
    by_kind[e["args"].get("op_name", "?")] += us
    # Node names: "/_blocks.B/Clip_output_0" is the expansion (block 0: the depthwise), "Clip_1"
    # the depthwise, "_project_conv/Conv" the projection; each a Conv with its Clip fused in.
    mm = re.search(r"_blocks\.(\d+)/(Clip_1|Clip|_project_conv)", e["name"])
    if mm:
        blk = int(mm.group(1))
        part = {"Clip_1": "depthwise", "_project_conv": "project"}.get(
            mm.group(2), "depthwise" if blk == 0 else "expand")
        key = f"block {blk:2d} {part}"
    else:
        key = "stem" if not by_block else "head + pool"
    by_block[key] += us
total = sum(by_kind.values())
print(f"ONNX Runtime {ort.__version__}, {size} px, batch {bs}, {threads} threads, {runs} runs: "
      f"{total / images / 1e3:.3f} ms of node time per image, {images / (total / 1e6):.0f} img/s "
      f"(nodes run one after another, each on all threads; profiling adds overhead)")
for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"  kind {k:24s} {v / images / 1e3:7.3f} ms/img  {100 * v / total:5.1f}%")
for k, v in by_block.items():
    print(f"  {k:24s} {v / images / 1e3:7.3f} ms/img  {100 * v / total:5.1f}%")
