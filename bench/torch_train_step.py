#!/usr/bin/env python3
"""Times one training step of the seed recipe in PyTorch (the anchor of `deeprank bench-train`):
EfficientNet-Lite0 + a linear head, full fine-tuning, BatchNorm in training mode, triplet margin
loss (gap 1.0) on the first 3 x TRIPLETS images of a dataset (q's, then p's, then n's), SGD with
Nesterov momentum 0.9, lr 1e-3, weight decay 1e-5. Same batch every step, as deeprank's.

  python torch_train_step.py TORCH_REFERENCE.py WEIGHTS DATA_DIR SIZE [TRIPLETS] [DIM] [WARMUP] [STEPS]
Variants (the same as ../shared/reference/torch_train_anchor.py): CHANNELS_LAST=1 (model and batch in
channels_last), COMPILE=1 (torch.compile of the forward, default mode; COMPILE=max uses
max-autotune-no-cudagraphs); a compiled run gets at least 5 warm-up steps. THREADS sets torch's
threads (default 2); the RESULT line names the variant and the threads really used.
"""
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F

ref_path, weights, data, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
triplets = int(sys.argv[5]) if len(sys.argv) > 5 else 16
dim = int(sys.argv[6]) if len(sys.argv) > 6 else 128
warmup = int(sys.argv[7]) if len(sys.argv) > 7 else 2
steps = int(sys.argv[8]) if len(sys.argv) > 8 else 5
spec = importlib.util.spec_from_file_location("ref", ref_path)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

images = os.path.join(data, "images") if os.path.isdir(os.path.join(data, "images")) else data
names = sorted(os.listdir(images))[: 3 * triplets]
x = torch.stack([ref.load_img(os.path.join(images, f), size) for f in names])
torch.manual_seed(0)
m = ref.load(weights, dim)
m.train()
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
variant = []
if os.environ.get("CHANNELS_LAST"):
    m = m.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    variant.append("channels_last")
fwd = m
if os.environ.get("COMPILE"):
    mode = "max-autotune-no-cudagraphs" if os.environ["COMPILE"] == "max" else "default"
    fwd = torch.compile(m, mode=mode)
    variant.append(f"compile-{mode}")
    warmup = max(warmup, 5)
opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-5)
total = 0.0
for i in range(warmup + steps):
    t0 = time.perf_counter()
    e = fwd(x)
    q, p, n = e.split(triplets)
    loss = F.triplet_margin_loss(q, p, n, margin=1.0, p=2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i >= warmup:
        total += time.perf_counter() - t0
sec = total / steps
print(f"RESULT torch_train variant={'+'.join(variant) or 'eager'} size={size} triplets={triplets} seconds_per_step={sec:.4f} "
      f"img_per_s={3 * triplets / sec:.1f} loss={loss.item():.4f} threads={torch.get_num_threads()}")
