#!/usr/bin/env python3
"""ANN anchors for bench/ann.sh: FAISS IndexHNSWFlat, hnswlib and usearch (PyPI), and exact FAISS IndexFlatL2.

The measuring calls are those of the reference script (ann_anchors.py, issue 10): M = 16,
efConstruction = 200, 2 threads, all queries in one call, recall@10 against the exact top-10.
Split in three steps so that the slow builds and the fast, load-sensitive searches run apart:

  ann_anchors.py truth  SET.npy           exact top-10 by IndexFlatL2 -> SET.npy.truth10.bin (u32, the file
                                          the Rust side reads too) and exact FAISS q/s (REPEAT timed calls)
  ann_anchors.py build  IMPL SET.npy DIR  build, save DIR/IMPL.index; prints build s, index file MB, peak RSS
  ann_anchors.py search IMPL SET.npy DIR  load DIR/IMPL.index; for each ef in EFS, REPEAT timed calls

IMPL: faiss | hnswlib | usearch. The last NQ (1000) rows of SET.npy are the queries, the rest the DB.
Env: THREADS (2), M (16), EFC (200), EFS (16,24,32,48,64,128), REPEAT (1), NQ (1000).
Every timed line also gives cpu = (user+system CPU seconds of this process, all threads) / wall seconds
over that call, i.e. how many cores the call really kept busy (at most THREADS when nothing else runs).
"""
import os
import resource
import sys
import time

import numpy as np

threads = int(os.environ.get("THREADS", "2"))
M = int(os.environ.get("M", "16"))
EFC = int(os.environ.get("EFC", "200"))
NQ = int(os.environ.get("NQ", "1000"))
REPEAT = int(os.environ.get("REPEAT", "1"))
EFS = [int(e) for e in os.environ.get("EFS", "16,24,32,48,64,128").split(",")]
K = 10


def load(path):
    x = np.ascontiguousarray(np.load(path, mmap_mode="r"), dtype=np.float32)
    return x[:-NQ], x[-NQ:]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads, microsecond resolution
    return r.ru_utime + r.ru_stime


def timed(f):
    c0, t0 = cpu_seconds(), time.perf_counter()
    r = f()
    t1, c1 = time.perf_counter(), cpu_seconds()
    return r, t1 - t0, (c1 - c0) / max(t1 - t0, 1e-9)


def loadavg():
    return open("/proc/loadavg").read().split()[0]


def tag(path):
    return os.path.splitext(os.path.basename(path))[0]


def main():
    mode = sys.argv[1]
    if mode == "truth":
        import faiss

        faiss.omp_set_num_threads(threads)
        path = sys.argv[2]
        db, q = load(path)
        flat = faiss.IndexFlatL2(db.shape[1])
        flat.add(db)
        for _ in range(REPEAT):
            (_, ids), s, cpu = timed(lambda: flat.search(q, K))
            print(f"RESULT set={tag(path)} impl=faiss-flat-exact ef=- recall10=1.0000 qps={len(q) / s:.0f} "
                  f"seconds={s:.4f} cpu={cpu:.2f} threads={threads} load={loadavg()}", flush=True)
        ids.astype("<u4").tofile(path + f".truth{K}.bin")
        return

    impl, path, out = sys.argv[2], sys.argv[3], sys.argv[4]
    db, q = load(path)
    n, d = db.shape
    f = os.path.join(out, f"{impl}.index")
    truth = np.fromfile(path + f".truth{K}.bin", dtype="<u4").reshape(-1, K)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth)])

    if impl == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        if mode == "build":
            h = faiss.IndexHNSWFlat(d, M)
            h.hnsw.efConstruction = EFC
            _, tb, cpu = timed(lambda: h.add(db))
            faiss.write_index(h, f)
        else:
            h = faiss.read_index(f)

        def search(ef):
            h.hnsw.efSearch = ef
            return h.search(q, K)[1]
    elif impl == "hnswlib":
        import hnswlib

        p = hnswlib.Index(space="l2", dim=d)
        if mode == "build":
            p.init_index(max_elements=n, ef_construction=EFC, M=M)
            p.set_num_threads(threads)
            _, tb, cpu = timed(lambda: p.add_items(db))
            p.save_index(f)
        else:
            p.load_index(f, max_elements=n)
            p.set_num_threads(threads)

        def search(ef):
            p.set_ef(max(ef, K))
            return p.knn_query(q, k=K)[0]
    elif impl == "usearch":
        from usearch.index import Index

        if mode == "build":
            u = Index(ndim=d, metric="l2sq", dtype="f32", connectivity=M, expansion_add=EFC)
            _, tb, cpu = timed(lambda: u.add(np.arange(n), db, threads=threads))
            u.save(f)
        else:
            u = Index.restore(f)

        def search(ef):
            u.expansion_search = ef
            return u.search(q, K, threads=threads).keys
    else:
        sys.exit(f"unknown IMPL {impl}: faiss, hnswlib or usearch")

    name = {"faiss": "faiss-hnsw", "hnswlib": "hnswlib", "usearch": "usearch"}[impl]
    mb = os.path.getsize(f) / 1048576.0
    if mode == "build":
        print(f"BUILD set={tag(path)} impl={name} n={n} d={d} M={M} efC={EFC} build_s={tb:.1f} cpu={cpu:.2f} "
              f"index_mb={mb:.1f} peak_rss_mb={peak_rss_mb():.0f} threads={threads} load={loadavg()}", flush=True)
        return
    for ef in EFS:
        for _ in range(REPEAT):
            ids, s, cpu = timed(lambda: search(ef))
            print(f"RESULT set={tag(path)} impl={name} ef={ef} recall10={recall(ids):.4f} qps={len(q) / s:.0f} "
                  f"seconds={s:.4f} cpu={cpu:.2f} index_mb={mb:.1f} peak_rss_mb={peak_rss_mb():.0f} "
                  f"threads={threads} load={loadavg()}", flush=True)


if __name__ == "__main__":
    main()
