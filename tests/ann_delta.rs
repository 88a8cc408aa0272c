//! A delta over a saved ANN graph file (`search::ann::delta`): the graph file plus a delta search
//! exactly like the extended graph in memory; each delta carries the previous one's lists; a
//! damaged or foreign delta is an error, never a panic. (The DB-level behaviour — `refresh`
//! writing deltas, the crash points — is in `tests/ann.rs` and `tests/crash.rs`.)

use deeprank::search::ann::{Hit, Hnsw, Params};

const DIM: usize = 24;

/// `n` rows of `dim` floats in 20 clusters (each a random 4-d patch plus a little noise).
fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let rng = |seed: u64| {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    };
    let mut c = rng(77);
    let centres: Vec<f32> = (0..20 * dim).map(|_| 4.0 * c()).collect();
    let basis: Vec<f32> = (0..20 * 4 * dim).map(|_| c()).collect();
    let mut r = rng(seed);
    (0..n)
        .flat_map(|i| {
            let k = i % 20;
            let z: Vec<f32> = (0..4).map(|_| 2.0 * r()).collect();
            (0..dim)
                .map(|j| {
                    centres[k * dim + j]
                        + (0..4)
                            .map(|t| z[t] * basis[(k * 4 + t) * dim + j])
                            .sum::<f32>()
                        + 0.05 * r()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn brute(v: &[f32], q: &[f32], k: usize) -> Vec<u32> {
    let mut d: Vec<(f32, u32)> = v
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, r)| (deeprank::cpu::l2::sq_l2(q, r), i as u32))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    d.into_iter().take(k).map(|x| x.1).collect()
}

fn ids(h: &[Hit]) -> Vec<u32> {
    h.iter().map(|x| x.id).collect()
}

/// On one thread: the graph is the same on every run.
fn one<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}

fn params(seed: u64) -> Params {
    Params {
        m: 8,
        ef_construction: 100,
        seed,
    }
}

/// An update written as a delta over the saved graph: the graph file plus the delta search exactly
/// like the extended graph in memory, two updates in a row (the second delta carries the first's
/// lists, written against the same graph file); the combined graph saved whole searches the same;
/// a damaged delta, or one over another graph file, is an error, never a panic.
#[test]
fn delta_over_a_saved_graph_equals_the_extended_graph() {
    let v = data(3000, DIM, 1);
    let q = data(40, DIM, 2);
    let h = one(|| Hnsw::build(&v, DIM, &params(3)));
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("ann.hnsw");
    let save = |p: &std::path::Path, f: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut b = vec![];
        f(&mut b).unwrap();
        std::fs::write(p, &b).unwrap();
        b
    };
    save(&base, &|b| h.save(b));
    let mut all = v.clone();
    let mut prev: Option<std::path::PathBuf> = None;
    for round in 0..2u64 {
        let mut o = Hnsw::open(&base).unwrap();
        if let Some(d) = &prev {
            o = o.open_delta(d).unwrap();
        }
        all.extend(data(50, DIM, 5 + round));
        one(|| o.extend(&all));
        let touched = o.take_touched();
        let p = o.delta_nodes(&touched).unwrap();
        assert!(
            !p.is_empty() && p.len() < 1500,
            "{} base lists changed",
            p.len()
        );
        let dp = dir.path().join(format!("ann-{round}.hnsd"));
        save(&dp, &|b| o.save_delta(&p, b));
        let r = Hnsw::open(&base).unwrap().open_delta(&dp).unwrap();
        assert_eq!((r.len(), r.base_len()), (3050 + 50 * round as usize, 3000));
        for qq in q.chunks_exact(DIM) {
            assert_eq!(
                o.search(&all, qq, 10, 40, None),
                r.search(&all, qq, 10, 40, None)
            );
            assert_eq!(ids(&r.search(&all, qq, 10, 400, None)), brute(&all, qq, 10));
        }
        prev = Some(dp);
    }
    let prev = prev.unwrap();
    let r = Hnsw::open(&base).unwrap().open_delta(&prev).unwrap();
    let whole = dir.path().join("whole.hnsw");
    save(&whole, &|b| r.save(b));
    let w = Hnsw::open(&whole).unwrap();
    for qq in q.chunks_exact(DIM) {
        assert_eq!(
            w.search(&all, qq, 10, 40, None),
            r.search(&all, qq, 10, 40, None)
        );
    }
    // A delta over another graph file.
    let other = dir.path().join("other.hnsw");
    let h2 = one(|| Hnsw::build(&v, DIM, &params(4)));
    save(&other, &|b| h2.save(b));
    let e = Hnsw::open(&other).unwrap().open_delta(&prev).err().unwrap();
    assert!(e.to_string().contains("another index file"), "{e}");
    // Damaged deltas.
    let good = std::fs::read(&prev).unwrap();
    let bad = dir.path().join("bad.hnsd");
    let try_open = |b: &[u8]| {
        std::fs::write(&bad, b).unwrap();
        Hnsw::open(&base).unwrap().open_delta(&bad)
    };
    assert!(try_open(&good[..good.len() - 8]).is_err(), "truncated");
    let mut b = good.clone();
    b[40] ^= 1; // the patched count, under the header checksum
    assert!(try_open(&b).is_err(), "header bit flip");
    let mut s = 777u64;
    for _ in 0..300 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut b = good.clone();
        let at = (s >> 33) as usize % b.len();
        b[at] ^= 1 << ((s >> 20) % 8);
        if let Ok(o) = try_open(&b) {
            let _ = o.search(&all, &q[..DIM], 10, 64, None);
        }
    }
}
