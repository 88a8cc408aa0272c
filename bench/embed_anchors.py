#!/usr/bin/env python3
"""Inference anchors for `deeprank embed`, each in its best configuration: PyTorch eager, eager in
channels_last, torch.compile (max-autotune-no-cudagraphs) and ONNX Runtime (CPU EP, graph exported
from the reference network's pooled features, ORT_ENABLE_ALL). Same Lite0 weights, pooled 1280-d
features, THREADS compute threads (default 2).

  python bench/embed_anchors.py TORCH_REFERENCE.py WEIGHTS VAL_DIR SIZE [ENGINES] [MODES]
    ENGINES: comma list of eager,eager_cl,compile,ort (default all)
    MODES:   comma list of (default net,e2e)
      net  network only: every image decoded beforehand into one tensor; batches of BATCH (64),
           full batches only (the last partial one is left out so torch.compile never recompiles),
           after one warm-up batch of the same shape.
      e2e  end to end: PIL decode + resize + normalise in a torch DataLoader with WORKERS (2)
           worker processes (1 torch thread each) overlapping the network, as deeprank's decode
           overlaps its engine; the timing includes the loader's start-up.
      b1   batch-1 latency: LAT_N (200) single images one after another (pre-decoded), after 10
           warm-up calls; prints p50 and p99 in milliseconds.
Prints one RESULT line per engine and mode, with the threads really used, and a CHECK line giving
each engine's largest difference from eager (their outputs must agree, or the timing means nothing).
"""
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import torch

ref, weights, val_dir, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engines = (sys.argv[5] if len(sys.argv) > 5 else "eager,eager_cl,compile,ort").split(",")
modes = (sys.argv[6] if len(sys.argv) > 6 else "net,e2e").split(",")
bs = int(os.environ.get("BATCH", "64"))
threads = int(os.environ.get("THREADS", "2"))
workers = int(os.environ.get("WORKERS", "2"))
lat_n = int(os.environ.get("LAT_N", "200"))
torch.set_num_threads(threads)
spec = importlib.util.spec_from_file_location("torch_reference", ref)
tr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tr)
items = sorted(os.path.join(val_dir, "images", line.split("\t")[0])
               for line in open(os.path.join(val_dir, "val_annotations.txt")))
n_full = (len(items) // bs) * bs


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return len(items)

    def __getitem__(self, i):
        return tr.load_img(items[i], size)


def one_thread(_):
    torch.set_num_threads(1)


def loader():
    return torch.utils.data.DataLoader(Images(), batch_size=bs, num_workers=workers, drop_last=True,
                                       worker_init_fn=one_thread, prefetch_factor=4 if workers else None)


class Pooled(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.pooled(x)


def make(engine):
    """(prepare(batch tensor) -> input, run(input) -> numpy features)."""
    m = tr.load(weights).eval()
    if engine == "eager":
        return (lambda b: b), (lambda b: m.pooled(b).numpy())
    if engine == "eager_cl":
        m = m.to(memory_format=torch.channels_last)
        return (lambda b: b.contiguous(memory_format=torch.channels_last)), (lambda b: m.pooled(b).numpy())
    if engine == "compile":
        cm = torch.compile(m.pooled, mode="max-autotune-no-cudagraphs")
        return (lambda b: b), (lambda b: cm(b).numpy())
    if engine == "ort":
        import onnxruntime as ort
        path = os.path.join(tempfile.mkdtemp(), f"lite0-{size}.onnx")
        dummy = torch.zeros(bs, 3, size, size)
        torch.onnx.export(Pooled(m), (dummy,), path, input_names=["x"], output_names=["f"],
                          dynamic_axes={"x": {0: "n"}, "f": {0: "n"}}, opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return (lambda b: b.numpy()), (lambda b: sess.run(None, {"x": b})[0])
    raise SystemExit(f"unknown engine {engine!r}: use eager, eager_cl, compile or ort")


def report(engine, mode, images, seconds, extra=""):
    print(f"RESULT engine={engine} mode={mode} size={size} batch={bs} images={images} "
          f"seconds={seconds:.3f} img_per_s={images / seconds:.1f} threads={threads}"
          f"{' workers=' + str(workers) if mode == 'e2e' else ''}{extra}", flush=True)


decoded = None
reference = {}
with torch.no_grad():
    for engine in engines:
        prep, run = make(engine)
        for mode in modes:
            if mode in ("net", "b1") and decoded is None:
                decoded = torch.stack([tr.load_img(p, size) for p in items])
            if mode == "net":
                batches = [prep(decoded[i:i + bs]) for i in range(0, n_full, bs)]
                run(batches[0])
                if engine == "compile":
                    run(batches[0])  # autotuning finishes on the first calls
                t0 = time.perf_counter()
                outs = [run(b) for b in batches]
                report(engine, mode, n_full, time.perf_counter() - t0)
                out = np.concatenate(outs)
                if "eager" not in reference:
                    reference["eager"] = out if engine == "eager" else None
                if engine != "eager" and reference.get("eager") is not None:
                    print(f"CHECK engine={engine} max_abs_diff_vs_eager={np.abs(out - reference['eager']).max():.2e}")
            elif mode == "e2e":
                run(prep(torch.zeros(bs, 3, size, size)))
                t0 = time.perf_counter()
                n = 0
                for b in loader():
                    n += run(prep(b)).shape[0]
                report(engine, mode, n, time.perf_counter() - t0)
            elif mode == "b1":
                singles = [prep(decoded[i:i + 1]) for i in range(min(lat_n, len(items)))]
                for s in singles[:10]:
                    run(s)
                lat = []
                for s in singles:
                    t0 = time.perf_counter()
                    run(s)
                    lat.append((time.perf_counter() - t0) * 1e3)
                p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
                report(engine, mode, len(lat), sum(lat) / 1e3, f" p50_ms={p50:.2f} p99_ms={p99:.2f}")
            else:
                raise SystemExit(f"unknown mode {mode!r}: use net, e2e or b1")
