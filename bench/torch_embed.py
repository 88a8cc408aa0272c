#!/usr/bin/env python3
"""PyTorch anchor for embed throughput: the reference's EfficientNet-Lite0 (same weights), eval mode,
PIL decode + bilinear resize + normalise, batch 64, pooled features, THREADS threads (default 2).

  python bench/torch_embed.py TORCH_REFERENCE.py WEIGHTS VAL_DIR SIZE
Prints: RESULT torch_embed size=S images=N seconds=T img_per_s=R
"""
import importlib.util
import os
import sys
import time

import torch

ref, weights, val_dir, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec = importlib.util.spec_from_file_location("torch_reference", ref)
tr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tr)
items = []
for line in open(os.path.join(val_dir, "val_annotations.txt")):
    f = line.split("\t")[0]
    items.append(os.path.join(val_dir, "images", f))
items.sort()
m = tr.load(weights).eval()
with torch.no_grad():
    m.pooled(torch.stack([tr.load_img(p, size) for p in items[:8]]))  # warm-up
    t0 = time.time()
    n = 0
    for i in range(0, len(items), 64):
        x = torch.stack([tr.load_img(p, size) for p in items[i:i + 64]])
        f = m.pooled(x)
        n += f.shape[0]
    dt = time.time() - t0
print(f"RESULT torch_embed size={size} images={n} seconds={dt:.2f} img_per_s={n / dt:.1f} threads={torch.get_num_threads()}")
