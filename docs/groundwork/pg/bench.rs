//! Rough measurements against servers started by pg.sh.
//!   bench insert  URL DIM N [stage|check] [BATCH]      fresh collection, N rows, prints rows/s
//!   bench shard   COORD SHARD1,SHARD2 DIM N [BATCH]    same through a coordinator into shards
//!   bench query   URL DIM N_QUERIES K [M EFC]          exact, then HNSW (built if missing) at several ef
//! URLs without table=: the table is named b<DIM> (s<DIM> when sharded).

use pgstore::pg::{
    Filter, Iterative, Mode, PgStore, RowRef, ShardOptions, StoreMeta, WriteMode, id_from_hash,
    init_sharded,
};
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Row i of a deterministic clustered data set (100 classes).
fn row(i: usize, dim: usize, centers: &[f32], out: &mut Vec<f32>) -> (String, String, [u8; 32]) {
    let mut r = Rng((i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let c = (r.next() % 100) as usize;
    out.clear();
    for j in 0..dim {
        out.push(centers[c * dim + j] + 0.5 * r.f32());
    }
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&r.next().to_be_bytes());
    h[8..16].copy_from_slice(&(i as u64).to_be_bytes());
    (
        format!("class{c:03}/img{i:08}.jpg"),
        format!("class{c:03}"),
        h,
    )
}

fn centers(dim: usize) -> Vec<f32> {
    let mut r = Rng(12345);
    (0..100 * dim).map(|_| r.f32()).collect()
}

fn meta(dim: usize) -> StoreMeta {
    StoreMeta {
        model: "bench".into(),
        size: 224,
        dim,
        normalized: false,
        info: serde_json::json!({}),
    }
}

fn load(s: &mut PgStore, dim: usize, n: usize) -> f64 {
    let cs = centers(dim);
    let mut v = Vec::with_capacity(dim);
    let t = Instant::now();
    let mut new = 0;
    for i in 0..n {
        let (p, c, h) = row(i, dim, &cs, &mut v);
        new += s
            .push(RowRef {
                id: id_from_hash(&h),
                path: &p,
                class: &c,
                content_hash: &h,
                embedding: &v,
            })
            .unwrap();
    }
    new += s.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(new as usize, n);
    secs
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a[0].as_str() {
        "insert" => {
            let (url, dim, n) = (&a[1], a[2].parse().unwrap(), a[3].parse().unwrap());
            let mode = match a.get(4).map(String::as_str) {
                Some("check") => WriteMode::CheckThenCopy,
                _ => WriteMode::Stage,
            };
            let table = format!("b{dim}{}", if mode == WriteMode::Stage { "" } else { "c" });
            let u = format!("{url}?table={table}");
            {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_meta"
                ))
                .unwrap();
            }
            let mut s = PgStore::create(&u, &meta(dim)).unwrap();
            s.write_mode = mode;
            s.batch_rows = a.get(5).map(|b| b.parse().unwrap()).unwrap_or(2000);
            let secs = load(&mut s, dim, n);
            println!(
                "insert {mode:?} dim {dim} n {n} batch {}: {secs:.1} s, {:.0} rows/s",
                s.batch_rows,
                n as f64 / secs
            );
            let t = Instant::now();
            let again = {
                let cs = centers(dim);
                let mut v = Vec::new();
                let mut new = 0;
                for i in 0..n {
                    let (p, c, h) = row(i, dim, &cs, &mut v);
                    new += s
                        .push(RowRef {
                            id: id_from_hash(&h),
                            path: &p,
                            class: &c,
                            content_hash: &h,
                            embedding: &v,
                        })
                        .unwrap();
                }
                new + s.flush().unwrap()
            };
            let secs = t.elapsed().as_secs_f64();
            println!(
                "  re-run (all present, {again} new): {secs:.1} s, {:.0} rows/s",
                n as f64 / secs
            );
            let t = Instant::now();
            let mut k = 0;
            s.for_each_row(|_| {
                k += 1;
                Ok(())
            })
            .unwrap();
            println!("  stream all {k} rows: {:.1} s", t.elapsed().as_secs_f64());
        }
        "shard" => {
            let (co, shards, dim, n): (&str, Vec<&str>, usize, usize) = (
                &a[1],
                a[2].split(',').collect(),
                a[3].parse().unwrap(),
                a[4].parse().unwrap(),
            );
            let table = format!("s{dim}");
            for u in std::iter::once(co).chain(shards.iter().copied()) {
                let mut c = postgres::Client::connect(u, postgres::NoTls).unwrap();
                c.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_meta; DROP SERVER IF EXISTS {table}_s0 CASCADE; DROP SERVER IF EXISTS {table}_s1 CASCADE"
                ))
                .unwrap_or_else(|e| panic!("{u}: {e}"));
            }
            let su: Vec<String> = shards
                .iter()
                .map(|s| format!("{s}?table={table}"))
                .collect();
            let sr: Vec<&str> = su.iter().map(String::as_str).collect();
            let mut s = init_sharded(
                &format!("{co}?table={table}"),
                &sr,
                &meta(dim),
                &ShardOptions::default(),
            )
            .unwrap();
            s.batch_rows = a.get(5).map(|b| b.parse().unwrap()).unwrap_or(2000);
            s.write_mode = match a.get(6).map(String::as_str) {
                Some("check") => WriteMode::CheckThenCopy,
                Some("direct") => WriteMode::DirectToShards,
                _ => WriteMode::Stage,
            };
            let secs = load(&mut s, dim, n);
            println!(
                "sharded insert {:?} dim {dim} n {n} batch {}: {secs:.1} s, {:.0} rows/s",
                s.write_mode,
                s.batch_rows,
                n as f64 / secs
            );
            let t = Instant::now();
            let mut k = 0;
            s.for_each_row(|_| {
                k += 1;
                Ok(())
            })
            .unwrap();
            println!(
                "  stream all {k} rows through the coordinator: {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        "query" => {
            let (url, dim, nq, k): (&str, usize, usize, usize) = (
                &a[1],
                a[2].parse().unwrap(),
                a[3].parse().unwrap(),
                a[4].parse().unwrap(),
            );
            let m: u32 = a.get(5).map(|x| x.parse().unwrap()).unwrap_or(16);
            let efc: u32 = a.get(6).map(|x| x.parse().unwrap()).unwrap_or(64);
            let mut s = PgStore::open(url, None).unwrap();
            let n = s.count().unwrap() as usize;
            let cs = centers(dim);
            let mut qr = Rng(777);
            let queries: Vec<Vec<f32>> = (0..nq)
                .map(|_| {
                    let mut v = Vec::new();
                    row((qr.next() % n as u64) as usize, dim, &cs, &mut v);
                    v.iter().map(|x| x + 0.2 * qr.f32()).collect()
                })
                .collect();
            let f = Filter::default();
            let fc = Filter {
                class: Some("class042".into()),
                path_prefix: None,
            };
            let mut exact = Vec::new();
            for (label, filter) in [("exact", &f), ("exact class=1/100", &fc)] {
                let mut lat = Vec::new();
                let mut res = Vec::new();
                for qv in &queries {
                    let t = Instant::now();
                    let h = s.search(qv, k, Mode::Exact, filter).unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    res.push(h.into_iter().map(|h| h.id).collect::<Vec<_>>());
                }
                let total: f64 = lat.iter().sum();
                println!(
                    "{url} n={n} dim={dim} {label}: p50 {:.1} ms, p99 {:.1} ms, {:.1} q/s (one client)",
                    pct(&mut lat.clone(), 0.5),
                    pct(&mut lat, 0.99),
                    nq as f64 / total * 1e3
                );
                if filter.class.is_none() {
                    exact = res;
                }
            }
            if std::env::var("NOHNSW").is_ok() {
                println!(
                    "--- plan: exact\n{}",
                    s.explain_search(&queries[0], k, Mode::Exact, &f).unwrap()
                );
                return;
            }
            let t = Instant::now();
            s.create_index(m, efc).unwrap();
            println!(
                "  HNSW m={m} efc={efc} build (or present): {:.1} s",
                t.elapsed().as_secs_f64()
            );
            for ef in [40u32, 100, 200] {
                if s.is_sharded() {
                    s.set_shard_search(ef, Iterative::Relaxed).unwrap();
                }
                let mut lat = Vec::new();
                let mut hit = 0;
                for (qv, ex) in queries.iter().zip(&exact) {
                    let t = Instant::now();
                    let h = s
                        .search(
                            qv,
                            k,
                            Mode::Hnsw {
                                ef,
                                iterative: Iterative::Relaxed,
                            },
                            &f,
                        )
                        .unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    hit += h.iter().filter(|h| ex.contains(&h.id)).count();
                }
                let total: f64 = lat.iter().sum();
                println!(
                    "  HNSW ef={ef}: recall@{k} {:.3}, p50 {:.2} ms, p99 {:.2} ms, {:.0} q/s (one client)",
                    hit as f64 / (nq * k) as f64,
                    pct(&mut lat.clone(), 0.5),
                    pct(&mut lat, 0.99),
                    nq as f64 / total * 1e3
                );
            }
            let q = &queries[0];
            for (label, mode, filter) in [
                ("exact", Mode::Exact, &f),
                (
                    "hnsw ef=40",
                    Mode::Hnsw {
                        ef: 40,
                        iterative: Iterative::Relaxed,
                    },
                    &f,
                ),
                (
                    "hnsw ef=40 class filter",
                    Mode::Hnsw {
                        ef: 40,
                        iterative: Iterative::Relaxed,
                    },
                    &fc,
                ),
            ] {
                if s.is_sharded() {
                    s.set_shard_search(40, Iterative::Relaxed).unwrap();
                }
                println!(
                    "--- plan: {label}\n{}",
                    s.explain_search(q, k, mode, filter).unwrap()
                );
            }
        }
        _ => panic!("bench insert|shard|query …"),
    }
}
