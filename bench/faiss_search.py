#!/usr/bin/env python3
"""FAISS anchor for exact search: IndexFlatL2 over the same .npy arrays deeprank searched.

  python bench/faiss_search.py DB.npy QUERIES.npy K [RUNS]
Prints: RESULT faiss_search n=N queries=Q k=K seconds=T (best of RUNS, THREADS threads, default 2)
"""
import os
import sys
import time

import faiss
import numpy as np

faiss.omp_set_num_threads(int(os.environ.get("THREADS", "2")))
db = np.load(sys.argv[1], mmap_mode="r")
q = np.ascontiguousarray(np.load(sys.argv[2]))
k = int(sys.argv[3])
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
index = faiss.IndexFlatL2(db.shape[1])
index.add(np.ascontiguousarray(db))
best = float("inf")
for _ in range(runs):
    t0 = time.perf_counter()
    index.search(q, k)
    best = min(best, time.perf_counter() - t0)
print(f"RESULT faiss_search n={db.shape[0]} queries={q.shape[0]} k={k} seconds={best:.5f}")
