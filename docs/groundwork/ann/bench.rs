//! bench VECTORS.npy IMPL [EFS] — IMPL: own | usearch | hnswrs | instant | exact.
//! Last NQ (1000) rows are queries. Env: THREADS (2), M (16), EFC (200), NQ (1000), SAVE (path, own).
//! For bench/ann.sh (PROTO=): BUILD_ONLY=1 (own: build, save to SAVE, print the BUILD line, exit),
//! LOAD=path (own: search that saved graph, memory-mapped, no build), REPEAT (timed calls per ef),
//! FILTERS=1 (own: also the filtered searches when SET.npy.labels.u16 exists). Each timed line gives
//! cpu = CPU seconds of all the process's threads / wall seconds, and the load average.
use annbench::{ann, exact, npy};
use rayon::prelude::*;
use std::time::Instant;

fn rss_mb(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with(field)).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}
fn cpu_s() -> f64 {
    // CPU time of every thread of this process, ns resolution (/proc/self/task/*/schedstat)
    let mut ns = 0u64;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            ns += s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap().split_whitespace().next().unwrap().to_string()
}
fn env(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (path, imp) = (&a[1], a[2].as_str());
    let efs: Vec<usize> = a.get(3).map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![16, 32, 64, 128]);
    let (threads, m, efc, nq, k) = (env("THREADS", 2), env("M", 16), env("EFC", 200), env("NQ", 1000), 10);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    let (x, n_all, dim) = npy::read_f32(path).unwrap();
    let n = n_all - nq;
    let (db, qs) = x.split_at(n * dim);
    let tag = std::path::Path::new(path).file_stem().unwrap().to_string_lossy().to_string();
    let tp = format!("{path}.truth{k}.bin");
    let truth: Vec<u32> = if let Ok(b) = std::fs::read(&tp) {
        b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    } else {
        let t = Instant::now();
        let r = exact::search(db, dim, qs, k, &|_, _| false);
        let s = t.elapsed().as_secs_f64();
        println!("{tag} exact(deeprank index.rs, blocked gemm) {threads}t: {:.0} q/s ({s:.2}s for {nq})", nq as f64 / s);
        let v: Vec<u32> = r.iter().flat_map(|h| h.iter().map(|x| x.index as u32)).collect();
        std::fs::write(&tp, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        v
    };
    let recall = |res: &[Vec<u32>]| -> f64 {
        res.iter().enumerate().map(|(q, r)| r.iter().filter(|i| truth[q * k..(q + 1) * k].contains(i)).count()).sum::<usize>() as f64 / (nq * k) as f64
    };
    let base = rss_mb("VmRSS:");
    println!("{tag} n={n} d={dim} nq={nq} M={m} efC={efc} threads={threads} impl={imp} rss_after_load={base:.0}MB");
    let report = |name: &str, build: f64, size: f64, run: &dyn Fn(usize) -> Vec<Vec<u32>>| {
        for &ef in &efs {
            if env("WARMUP", 0) > 0 {
                let _ = run(ef); // optional warm-up pass; off by default, as in ann_anchors.py
            }
            for _ in 0..env("REPEAT", 1) {
                let (c, t) = (cpu_s(), Instant::now());
                let r = run(ef);
                let s = t.elapsed().as_secs_f64();
                let cpu = (cpu_s() - c) / s;
                println!("RESULT set={tag} impl={name} ef={ef} recall10={:.4} qps={:.0} seconds={s:.4} cpu={cpu:.2} build_s={build:.1} index_mb={size:.1} peak_rss_mb={:.0} threads={threads} load={}", recall(&r), nq as f64 / s, rss_mb("VmHWM:"), load());
                std::io::Write::flush(&mut std::io::stdout()).unwrap();
            }
        }
    };
    match imp {
        "exact" => {
            for _ in 0..env("REPEAT", 1) {
                let (c, t) = (cpu_s(), Instant::now());
                let r = exact::search(db, dim, qs, k, &|_, _| false);
                let s = t.elapsed().as_secs_f64();
                let cpu = (cpu_s() - c) / s;
                let ids: Vec<Vec<u32>> = r.iter().map(|h| h.iter().map(|x| x.index as u32).collect()).collect();
                println!("RESULT set={tag} impl=exact-deeprank-copy ef=- recall10={:.4} qps={:.0} seconds={s:.4} cpu={cpu:.2} build_s=0 index_mb=0 peak_rss_mb={:.0} threads={threads} load={}", recall(&ids), nq as f64 / s, rss_mb("VmHWM:"), load());
            }
        }
        "own" => {
          let sp = std::env::var("SAVE").unwrap_or(format!("/tmp/{tag}.hnsw"));
          let (h, b) = if let Ok(lp) = std::env::var("LOAD") {
            // search phase: the saved graph, memory-mapped (as the shipped index opens it)
            (ann::Hnsw::open(std::path::Path::new(&lp)).unwrap(), f64::NAN)
          } else {
            let (c0, t) = (cpu_s(), Instant::now());
            // The last 50 rows go in as an incremental add, timed on its own.
            let mut h = ann::Hnsw::build(&db[..(n - 50) * dim], dim, &ann::Params { m, ef_construction: efc, seed: 0x5eed });
            let b = t.elapsed().as_secs_f64();
            let bcpu = (cpu_s() - c0) / b;
            h.take_touched();
            let t = Instant::now();
            h.extend(db);
            println!("own-hnsw incremental add of 50 rows to {}: {:.1} ms, {} nodes' lists touched", n - 50, t.elapsed().as_secs_f64() * 1e3, h.take_touched().len());
            let mut w = std::io::BufWriter::new(std::fs::File::create(&sp).unwrap());
            h.save(&mut w).unwrap();
            drop(w);
            let size = std::fs::metadata(&sp).unwrap().len() as f64 / 1048576.0;
            println!("BUILD set={tag} impl=own-hnsw-proto n={n} d={dim} M={m} efC={efc} build_s={b:.1} cpu={bcpu:.2} index_mb={size:.1} peak_rss_mb={:.0} threads={threads} load={}", rss_mb("VmHWM:"), load());
            if env("BUILD_ONLY", 0) > 0 { return; }
            let h = if std::env::var("MAPPED").is_ok() { ann::Hnsw::open(std::path::Path::new(&sp)).unwrap() } else { h };
            (h, b)
          };
          let size = std::fs::metadata(std::env::var("LOAD").unwrap_or(sp.clone())).unwrap().len() as f64 / 1048576.0;
            report("own-hnsw-proto", b, size, &|ef| {
                qs.par_chunks(dim).map(|q| h.search(db, q, k, ef, None).iter().map(|x| x.id).collect()).collect()
            });
            if env("FILTERS", 0) == 0 { return; }
            if let Ok(lb) = std::fs::read(format!("{path}.labels.u16")) {
                let lab: Vec<u16> = lb.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                for kind in ["own-class", "even-classes"] {
                    let f = |q: usize, i: u32| if kind == "own-class" { lab[i as usize] == lab[n + q] } else { lab[i as usize] % 2 == 0 };
                    let truth: Vec<Vec<u32>> = (0..nq).into_par_iter().map(|q| h.scan(db, &qs[q * dim..(q + 1) * dim], k, &|i| f(q, i)).iter().map(|x| x.id).collect()).collect();
                    for &ef in &efs {
                        let run = || -> Vec<Vec<u32>> { (0..nq).into_par_iter().map(|q| h.search(db, &qs[q * dim..(q + 1) * dim], k, ef, Some(&|i| f(q, i))).iter().map(|x| x.id).collect()).collect() };
                        let t = Instant::now();
                        let r = run();
                        let s = t.elapsed().as_secs_f64();
                        let rec = r.iter().zip(&truth).map(|(a, b)| a.iter().filter(|i| b.contains(i)).count()).sum::<usize>() as f64 / (nq * k) as f64;
                        println!("RESULT set={tag} impl=own-hnsw-proto-filter:{kind} ef={ef} recall10={rec:.4} qps={:.0} threads={threads}", nq as f64 / s);
                    }
                }
            }
        }
        #[cfg(feature = "crates")]
        "usearch" => {
            use usearch::{Index, IndexOptions, MetricKind, ScalarKind};
            let o = IndexOptions { dimensions: dim, metric: MetricKind::L2sq, quantization: ScalarKind::F32, connectivity: m, expansion_add: efc, expansion_search: 64, multi: false };
            let ix = Index::new(&o).unwrap();
            ix.reserve_capacity_and_threads(n, threads).unwrap();
            let t = Instant::now();
            db.par_chunks(dim).enumerate().for_each(|(i, v)| ix.add(i as u64, v).unwrap());
            let b = t.elapsed().as_secs_f64();
            let size = ix.serialized_length() as f64 / 1048576.0;
            report("usearch-rs", b, size, &|ef| {
                ix.change_expansion_search(ef);
                qs.par_chunks(dim).map(|q| ix.search(q, k).unwrap().keys.iter().map(|&x| x as u32).collect()).collect()
            });
        }
        #[cfg(feature = "crates")]
        "hnswrs" => {
            use hnsw_rs::prelude::*;
            let h = Hnsw::<f32, DistL2>::new(m, n, 16, efc, DistL2 {});
            let data: Vec<(&[f32], usize)> = db.chunks_exact(dim).enumerate().map(|(i, v)| (v, i)).collect();
            let t = Instant::now();
            h.parallel_insert_slice(&data);
            let b = t.elapsed().as_secs_f64();
            report("hnsw_rs", b, f64::NAN, &|ef| {
                qs.par_chunks(dim).map(|q| h.search(q, k, ef).iter().map(|x| x.d_id as u32).collect()).collect()
            });
        }
        #[cfg(feature = "crates")]
        "instant" => {
            #[derive(Clone, Copy)]
            struct P<'a>(&'a [f32]);
            impl instant_distance::Point for P<'_> {
                fn distance(&self, o: &Self) -> f32 {
                    (annbench::ann_simd::l2_kernel())(self.0, o.0)
                }
            }
            let pts: Vec<P> = db.chunks_exact(dim).map(P).collect();
            for &ef in &efs {
                let t = Instant::now();
                let (h, ids) = instant_distance::Builder::default().ef_construction(efc).ef_search(ef).build_hnsw(pts.clone());
                let b = t.elapsed().as_secs_f64();
                let mut inv = vec![0u32; n];
                for (i, p) in ids.iter().enumerate() {
                    inv[p.into_inner() as usize] = i as u32;
                }
                report("instant-distance(M=32 fixed)", b, f64::NAN, &|_| {
                    qs.par_chunks(dim).map_init(instant_distance::Search::default, |s, q| h.search(&P(q), s).take(k).map(|it| inv[it.pid.into_inner() as usize]).collect()).collect()
                });
                if std::env::var("ALL_EF").is_err() { break; }
            }
        }
        _ => panic!("unknown impl {imp}"),
    }
}
