#!/usr/bin/env python3
"""Writes augmented copies of the Tiny ImageNet mini set as class folders: aug/<wnid>/<stem>_<v>.jpg.
Variant 0 is the original image; variants 1..V-1 are random crops (scale 0.35-1, aspect 3/4-4/3),
horizontal flips (p=0.5), small rotations, brightness/contrast jitter, and output sizes 48..112 px.
Usage: augment.py SRC_ROOT OUT V [worker_index n_workers]"""
import os, random, sys, zlib
from PIL import Image, ImageEnhance

src, out, V = sys.argv[1], sys.argv[2], int(sys.argv[3])
wi, nw = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (0, 1)
items = []
for w in sorted(os.listdir(f"{src}/train")):
    d = f"{src}/train/{w}/images"
    for f in sorted(os.listdir(d)):
        items.append((w, f"{d}/{f}", os.path.splitext(f)[0]))
for line in open(f"{src}/val/val_annotations.txt"):
    p = line.split("\t")
    items.append((p[1], f"{src}/val/images/{p[0]}", os.path.splitext(p[0])[0]))
for i, (w, path, stem) in enumerate(items):
    if i % nw != wi:
        continue
    os.makedirs(f"{out}/{w}", exist_ok=True)
    im = Image.open(path).convert("RGB")
    rng = random.Random(zlib.crc32(stem.encode()))
    im.save(f"{out}/{w}/{stem}_0.jpg", quality=92)
    W, H = im.size
    for v in range(1, V):
        s = rng.uniform(0.35, 1.0); a = rng.uniform(0.75, 1.333)
        cw = max(8, min(W, int(W * (s * a) ** 0.5))); ch = max(8, min(H, int(H * (s / a) ** 0.5)))
        x0 = rng.randint(0, W - cw); y0 = rng.randint(0, H - ch)
        t = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            t = t.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.3:
            t = t.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        t = ImageEnhance.Brightness(t).enhance(rng.uniform(0.8, 1.2))
        t = ImageEnhance.Contrast(t).enhance(rng.uniform(0.8, 1.2))
        side = rng.choice([48, 64, 80, 96, 112])
        t = t.resize((side, side), Image.BICUBIC)
        t.save(f"{out}/{w}/{stem}_{v}.jpg", quality=rng.choice([75, 85, 92]))
