#!/usr/bin/env python3
"""1M (+1000 query rows, last) clustered synthetic vectors: 2000 Gaussian clusters of uneven size, each a
random 16-d linear patch in R^D plus isotropic noise (low intrinsic dimension, like real embeddings).
Usage: synth.py OUT.npy [N] [D]"""
import sys
import numpy as np

out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
d = int(sys.argv[3]) if len(sys.argv) > 3 else 128
nq, C, r = 1000, 2000, 16
rng = np.random.default_rng(7)
centres = rng.normal(size=(C, d)).astype(np.float32)
bases = (rng.normal(size=(C, r, d)) / np.sqrt(d) * 0.6).astype(np.float32)
p = rng.dirichlet(np.full(C, 2.0))
lab = rng.choice(C, size=n + nq, p=p)
x = np.empty((n + nq, d), np.float32)
for s in range(0, n + nq, 100_000):
    l = lab[s:s + 100_000]
    z = rng.normal(size=(len(l), r)).astype(np.float32)
    x[s:s + len(l)] = centres[l] + np.einsum("nr,nrd->nd", z, bases[l]) + 0.08 * rng.normal(size=(len(l), d)).astype(np.float32)
np.save(out, x)
print(out, x.shape)
