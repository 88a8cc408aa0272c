#!/usr/bin/env python3
"""PIL + numpy anchor for the input pipeline: decode, RGB, bilinear resize, normalise to CHW f32,
as torch_reference.load_img does, over a val folder's images read into memory first; THREADS
threads (default 2; PIL releases the GIL while decoding and resizing).

  python bench/pil_decode.py VAL_DIR SIZE [RUNS]
"""
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

val_dir, size = sys.argv[1], int(sys.argv[2])
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
threads = int(os.environ.get("THREADS", "2"))
names = sorted(os.listdir(os.path.join(val_dir, "images")))
blobs = [open(os.path.join(val_dir, "images", n), "rb").read() for n in names]
MEAN = np.float32(0.498)
STD = np.float32(0.502)


def one(b):
    im = Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BILINEAR)
    a = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1))


best = float("inf")
with ThreadPoolExecutor(threads) as ex:
    for _ in range(runs):
        t0 = time.perf_counter()
        out = list(ex.map(one, blobs, chunksize=32))
        best = min(best, time.perf_counter() - t0)
print(f"RESULT pil_decode images={len(out)} size={size} seconds={best:.4f} img_per_s={len(out) / best:.0f}")
