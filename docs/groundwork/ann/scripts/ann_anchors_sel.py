#!/usr/bin/env python3
"""ANN anchors on real embeddings: FAISS IndexHNSWFlat, hnswlib and usearch vs exact (FAISS IndexFlatL2).

  python ann_anchors.py VECTORS.npy [NQ] [M]
The last NQ rows (default 1000) are the queries, the rest the DB. 2 threads (THREADS). Prints build time,
and for several ef values: recall@10 against the exact top-10 and queries/s (all queries in one call).
"""
import os
import sys
import time

import numpy as np

threads = int(os.environ.get("THREADS", "2"))
only = os.environ.get("ONLY", "faiss,hnswlib,usearch").split(",")  # local addition: pick anchors
x = np.load(sys.argv[1], mmap_mode="r")
nq = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
M = int(sys.argv[3]) if len(sys.argv) > 3 else 16
x = np.ascontiguousarray(x, dtype=np.float32)
db, q = x[:-nq], x[-nq:]
n, d = db.shape
k = 10
print(f"DB {n} x {d}, {nq} queries, M={M}, {threads} threads")

import faiss  # noqa: E402

faiss.omp_set_num_threads(threads)
flat = faiss.IndexFlatL2(d)
flat.add(db)
t = time.perf_counter(); _, truth = flat.search(q, k); te = time.perf_counter() - t
print(f"exact FAISS IndexFlatL2: {nq / te:.0f} q/s")


def recall(ids):
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)])


efs = [int(e) for e in os.environ.get("EFS", "16,32,64,128,256").split(",")]
if "faiss" in only:
  h = faiss.IndexHNSWFlat(d, M)
  h.hnsw.efConstruction = 200
  t = time.perf_counter(); h.add(db); tb = time.perf_counter() - t
  print(f"faiss-hnsw build {tb:.1f}s")
  for ef in efs:
      h.hnsw.efSearch = ef
      t = time.perf_counter(); _, ids = h.search(q, k); ts = time.perf_counter() - t
      print(f"  faiss-hnsw ef={ef}: recall@10 {recall(ids):.4f}  {nq / ts:.0f} q/s")

if "hnswlib" in only:
  import hnswlib  # noqa: E402

  p = hnswlib.Index(space="l2", dim=d)
  p.init_index(max_elements=n, ef_construction=200, M=M)
  p.set_num_threads(threads)
  t = time.perf_counter(); p.add_items(db); tb = time.perf_counter() - t
  print(f"hnswlib build {tb:.1f}s")
  for ef in efs:
      p.set_ef(max(ef, k))
      t = time.perf_counter(); ids, _ = p.knn_query(q, k=k); ts = time.perf_counter() - t
      print(f"  hnswlib ef={ef}: recall@10 {recall(ids):.4f}  {nq / ts:.0f} q/s")

if "usearch" in only:
  from usearch.index import Index  # noqa: E402

  u = Index(ndim=d, metric="l2sq", dtype="f32", connectivity=M, expansion_add=200)
  t = time.perf_counter(); u.add(np.arange(n), db, threads=threads); tb = time.perf_counter() - t
  print(f"usearch build {tb:.1f}s")
  for ef in efs:
      u.expansion_search = ef
      t = time.perf_counter(); m = u.search(q, k, threads=threads); ts = time.perf_counter() - t
      print(f"  usearch ef={ef}: recall@10 {recall(m.keys):.4f}  {nq / ts:.0f} q/s")
