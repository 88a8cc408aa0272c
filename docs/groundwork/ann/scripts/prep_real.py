#!/usr/bin/env python3
"""Real vectors for the ANN bench from a deeprank DB of the augmented set (or its unfinished .tmp folder).
Queries: the originals (variant _0) of 1000 source images chosen at random; every variant of those sources
is left out of the DB, so a query's own crops are not in it. Writes OUT.npy (DB rows then the 1000 query
rows last) and OUT.npy.labels.u16 (class index per row, for filtered-search tests).
Usage: prep_real.py DBDIR OUT.npy [MAXROWS]"""
import os, sys, re
import numpy as np

dbdir, out = sys.argv[1], sys.argv[2]
maxrows = int(sys.argv[3]) if len(sys.argv) > 3 else None
raw = np.fromfile(f"{dbdir}/vectors.npy", dtype=np.uint8)
x = raw[128:].view(np.float32)
rows = len(x) // 1280
man = [l.rstrip("\n").split("\t") for l in open(f"{dbdir}/manifest.tsv")]
if man and man[0][0] == "path":
    man = man[1:]
rows = min(rows, len(man), maxrows or 1 << 60)
x = x[: rows * 1280].reshape(rows, 1280)
paths = [m[0] for m in man[:rows]]
cls = [os.path.basename(os.path.dirname(p)) for p in paths]
src = [re.sub(r"_\d+\.jpg$", "", os.path.basename(p)) for p in paths]
var0 = [p.endswith("_0.jpg") for p in paths]
names = sorted(set(cls)); ci = {c: i for i, c in enumerate(names)}
rng = np.random.default_rng(0)
cand = [s for s, v in zip(src, var0) if v]
qsrc = set(rng.choice(cand, 1000, replace=False).tolist())
qrows = [i for i in range(rows) if var0[i] and src[i] in qsrc]
dbrows = [i for i in range(rows) if src[i] not in qsrc]
sel = dbrows + qrows
np.save(out, np.ascontiguousarray(x[sel]))
np.array([ci[cls[i]] for i in sel], dtype=np.uint16).tofile(out + ".labels.u16")
print(out, len(dbrows), "DB rows +", len(qrows), "queries;", len(names), "classes; norms", np.linalg.norm(x[sel[:5]], axis=1))
