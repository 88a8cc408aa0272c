#!/usr/bin/env python3
"""Real vectors for bench/ann.sh from deeprank DBs of the augmented set (bench/ann_augment.py).

  ann_prep_real.py OUT.npy DBDIR [DBDIR...] [--max-rows N]

The DBs' rows are concatenated (several DBs: e.g. one embed of part of the folders and another of the
rest; an unfinished `.NAME.tmp-PID` folder of a running or stopped embed also works: only the rows whose
vector is complete are used). Queries: the originals (variant _0) of 1000 source images chosen at random
(seed 0); every variant of those sources is left out of the DB, so a query's own crops are not in it.
Writes OUT.npy (DB rows, then the 1000 query rows last) and OUT.npy.labels.u16 (class index per row,
for filtered-search tests).
"""
import os
import re
import sys

import numpy as np

args = sys.argv[1:]
maxrows = None
if "--max-rows" in args:
    i = args.index("--max-rows")
    maxrows = int(args[i + 1])
    del args[i:i + 2]
out, dbdirs = args[0], args[1:]
xs, paths = [], []
for dbdir in dbdirs:
    raw = np.fromfile(f"{dbdir}/vectors.npy", dtype=np.uint8)
    hl = int.from_bytes(raw[8:10].tobytes(), "little") + 10  # npy v1 header
    header = raw[10:hl].tobytes().decode("latin1")
    dim = int(re.search(r"'shape': \(\d+, (\d+)\)", header).group(1))
    x = raw[hl:].view(np.float32)
    man = [line.rstrip("\n").split("\t") for line in open(f"{dbdir}/manifest.tsv")]
    pi = man[0].index("path") if man and "path" in man[0] else 0
    man = man[1:] if man and "path" in man[0] else man
    rows = min(len(x) // dim, len(man))
    xs.append(x[: rows * dim].reshape(rows, dim))
    paths += [m[pi] for m in man[:rows]]
    print(f"{dbdir}: {rows} rows x {dim}")
x = np.concatenate(xs)
rows = min(len(x), maxrows or 1 << 60)
x, paths = x[:rows], paths[:rows]
cls = [os.path.basename(os.path.dirname(p)) for p in paths]
src = [re.sub(r"_\d+\.jpg$", "", os.path.basename(p)) for p in paths]
var0 = [p.endswith("_0.jpg") for p in paths]
names = sorted(set(cls))
ci = {c: i for i, c in enumerate(names)}
rng = np.random.default_rng(0)
cand = [s for s, v in zip(src, var0) if v]
qsrc = set(rng.choice(cand, 1000, replace=False).tolist())
qrows = [i for i in range(rows) if var0[i] and src[i] in qsrc]
dbrows = [i for i in range(rows) if src[i] not in qsrc]
sel = dbrows + qrows
norms = np.linalg.norm(x[sel], axis=1)
assert norms.min() > 0.5, f"some vectors are (near) zero: min norm {norms.min()} (embed --size 32 bug?)"
np.save(out, np.ascontiguousarray(x[sel]))
np.array([ci[cls[i]] for i in sel], dtype=np.uint16).tofile(out + ".labels.u16")
print(out, len(dbrows), "DB rows +", len(qrows), "queries;", len(names), "classes; norms",
      f"{norms.min():.4f}-{norms.max():.4f}")
