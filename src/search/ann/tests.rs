//! Tests of the HNSW index against exact search.
use super::*;

/// `n` rows of `dim` floats in 20 clusters, each a random 4-d patch plus a little noise (low intrinsic
/// dimension, like real embeddings). The clusters depend on `dim` only; `seed` draws the points.
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

fn brute(v: &[f32], dim: usize, q: &[f32], k: usize, ok: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut d: Vec<(f32, u32)> = v
        .chunks_exact(dim)
        .enumerate()
        .filter(|(i, _)| ok(*i as u32))
        .map(|(i, r)| (crate::cpu::l2::sq_l2(q, r), i as u32))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    d.into_iter().take(k).map(|x| x.1).collect()
}

fn ids(h: &[Hit]) -> Vec<u32> {
    h.iter().map(|x| x.id).collect()
}

/// Runs `f` on a pool of one thread: the graph, built by one thread, is the same on every run, so
/// the exact-equality tests below pass or fail the same way every time (parallel builds insert in
/// a varying order, and a graph may leave a rare node unreachable; the parallel build is checked
/// by recall in `tests/bench.rs` and by the CLI tests).
fn one<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}

const DIM: usize = 24;
fn small() -> (Vec<f32>, Vec<f32>, Hnsw) {
    let v = data(3000, DIM, 1);
    let q = data(40, DIM, 2);
    let h = one(|| {
        Hnsw::build(
            &v,
            DIM,
            &Params {
                m: 8,
                ef_construction: 100,
                seed: 3,
            },
        )
    });
    (v, q, h)
}

#[test]
fn high_ef_equals_exact() {
    let (v, q, h) = small();
    for qq in q.chunks_exact(DIM) {
        assert_eq!(
            ids(&h.search(&v, qq, 10, 400, None)),
            brute(&v, DIM, qq, 10, |_| true)
        );
    }
    let batch = h.search_batch(&v, &q, 10, 400, None);
    assert_eq!(batch.len(), 40);
    // Distances are squared L2 and sorted.
    let r = &batch[0];
    assert!(r.windows(2).all(|w| w[0].dist <= w[1].dist));
    assert!(
        (r[0].dist - crate::cpu::l2::sq_l2(&q[..DIM], &v[r[0].id as usize * DIM..][..DIM])).abs()
            < 1e-3
    );
}

#[test]
fn deleted_never_returned() {
    let (v, q, mut h) = small();
    let first = ids(&h.search(&v, &q[..DIM], 10, 400, None));
    for &i in &first[..5] {
        assert!(h.remove(i));
        assert!(!h.remove(i), "second remove is a no-op");
    }
    for i in (0..3000).step_by(3) {
        h.remove(i);
    }
    assert_eq!(h.live(), 3000 - h.n_deleted);
    for qq in q.chunks_exact(DIM) {
        let got = ids(&h.search(&v, qq, 10, 400, None));
        assert_eq!(got, brute(&v, DIM, qq, 10, |i| !h.is_deleted(i)));
    }
}

#[test]
fn filters_dense_and_selective() {
    let (v, q, h) = small();
    let even = |i: u32| i.is_multiple_of(2); // HNSW path
    let rare = |i: u32| i % 97 == 5; // ~31 nodes: the exact scan path
    for qq in q.chunks_exact(DIM) {
        assert_eq!(
            ids(&h.search(&v, qq, 10, 400, Some(&even))),
            brute(&v, DIM, qq, 10, even)
        );
        assert_eq!(
            ids(&h.search(&v, qq, 10, 64, Some(&rare))),
            brute(&v, DIM, qq, 10, rare)
        );
    }
    let none = |_: u32| false;
    assert!(h.search(&v, &q[..DIM], 10, 64, Some(&none)).is_empty());
    // A filter passing fewer than k nodes returns all of them.
    let three = |i: u32| i < 3;
    assert_eq!(h.search(&v, &q[..DIM], 10, 64, Some(&three)).len(), 3);
}

#[test]
fn incremental_extend_matches_exact() {
    let v = data(3000, DIM, 1);
    let mut h = one(|| {
        Hnsw::build(
            &v[..1000 * DIM],
            DIM,
            &Params {
                m: 8,
                ef_construction: 100,
                seed: 3,
            },
        )
    });
    h.take_touched();
    one(|| h.extend(&v[..1050 * DIM]));
    let t = h.take_touched();
    assert!(
        t.len() >= 50 && t.len() < 1000,
        "an add of 50 touches few old nodes: {}",
        t.len()
    );
    one(|| h.extend(&v));
    assert_eq!(h.len(), 3000);
    for qq in data(20, DIM, 9).chunks_exact(DIM) {
        assert_eq!(
            ids(&h.search(&v, qq, 10, 400, None)),
            brute(&v, DIM, qq, 10, |_| true)
        );
    }
}

#[test]
fn save_open_round_trip_and_extend_mapped() {
    let (v, q, mut h) = small();
    h.remove(7);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ann.hnsw");
    h.save(&mut std::io::BufWriter::new(
        std::fs::File::create(&p).unwrap(),
    ))
    .unwrap();
    let mut o = Hnsw::open(&p).unwrap();
    assert!(matches!(o.l0, Slots::Mapped { .. }));
    assert_eq!((o.len(), o.dim(), o.live()), (3000, DIM, 2999));
    for qq in q.chunks_exact(DIM) {
        assert_eq!(
            h.search(&v, qq, 10, 50, None),
            o.search(&v, qq, 10, 50, None)
        );
    }
    let more = [v.clone(), data(200, DIM, 5)].concat();
    one(|| o.extend(&more));
    assert_eq!(o.len(), 3200);
    for qq in q.chunks_exact(DIM) {
        assert_eq!(
            ids(&o.search(&more, qq, 10, 400, None)),
            brute(&more, DIM, qq, 10, |i| i != 7)
        );
    }
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let (v, q, h) = small();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ann.hnsw");
    let mut good = vec![];
    h.save(&mut good).unwrap();
    let check = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        // Either an error, or an index that searches without panicking.
        if let Ok(o) = Hnsw::open(&p) {
            let _ = o.search(&v, &q[..DIM], 10, 64, None);
        }
    };
    std::fs::write(&p, &good[..good.len() - 4]).unwrap();
    assert!(Hnsw::open(&p).is_err(), "truncated");
    std::fs::write(&p, b"not an index").unwrap();
    assert!(Hnsw::open(&p).is_err(), "garbage");
    let mut b = good.clone();
    b[12] ^= 1; // m, covered by the header checksum
    std::fs::write(&p, &b).unwrap();
    assert!(Hnsw::open(&p).is_err(), "header bit flip");
    // A neighbour id out of range in the layer-0 array.
    let mut b = good.clone();
    let n = 3000usize;
    let o_l0 = HEADER + n.div_ceil(8) * 8 + (4 * n).div_ceil(8) * 8 + 8 * n.div_ceil(64);
    b[o_l0 + 4..o_l0 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = Hnsw::open(&p).err().expect("bad neighbour id");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    // An upper-level list naming a node that does not reach that level (its own list there would
    // be read out of range during search).
    let mut b = good.clone();
    let r8 = |x: usize| x.div_ceil(8) * 8;
    let (m, lv) = (8usize, &good[HEADER..HEADER + n]);
    let i = lv
        .iter()
        .position(|&l| l >= 1)
        .expect("a node above level 0");
    let j = lv.iter().position(|&l| l == 0).expect("a node at level 0");
    let o_up = HEADER + r8(n);
    let o_u = o_l0 + r8(4 * n * (1 + 2 * m));
    let off = u32::from_le_bytes(good[o_up + 4 * i..o_up + 4 * i + 4].try_into().unwrap());
    let slot = o_u + 4 * off as usize;
    b[slot..slot + 4].copy_from_slice(&1u32.to_le_bytes());
    b[slot + 4..slot + 8].copy_from_slice(&(j as u32).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = Hnsw::open(&p)
        .err()
        .expect("an upper neighbour below its level");
    assert!(e.to_string().contains("below its level"), "{e}");
    // An upper offset that is not at the start of a list (its "count" would be a neighbour id).
    let mut b = good.clone();
    b[o_up + 4 * i..o_up + 4 * i + 4].copy_from_slice(&(off + 1).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = Hnsw::open(&p).err().expect("a misaligned upper offset");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    // Many single-byte flips all over the file.
    let mut s = 12345u64;
    for _ in 0..300 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut b = good.clone();
        let at = (s >> 33) as usize % b.len();
        b[at] ^= 1 << ((s >> 20) % 8);
        check(&b);
    }
}

#[test]
fn empty_and_tiny() {
    let h = Hnsw::new(4, &Params::default());
    assert!(h.search(&[], &[0.0; 4], 5, 10, None).is_empty());
    let v = [0.0f32, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    let h = Hnsw::build(&v, 4, &Params::default());
    assert_eq!(ids(&h.search(&v, &[0.9; 4], 5, 10, None)), vec![1, 0]);
}

#[test]
fn calibration_is_saved_and_picks_the_smallest_ef() {
    let (v, _, mut h) = small();
    h.calibrate(&v, 100);
    assert_eq!(h.calibration.len(), build::EF_LADDER.len());
    assert!(h.calibration.iter().all(|&(_, r)| (0.0..=1.0).contains(&r)));
    // At the top of the ladder this small set is found exactly.
    assert!(
        h.calibration.last().unwrap().1 >= 0.99,
        "{:?}",
        h.calibration
    );
    let ef = h.ef_for_recall(0.9).expect("0.9 is reached");
    let first = h.calibration.iter().find(|c| c.1 >= 0.9).unwrap().0 as usize;
    assert_eq!(ef, first);
    assert_eq!(h.ef_for_recall(1.01), None);
    let mut b = vec![];
    h.save(&mut b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ann.hnsw");
    std::fs::write(&p, &b).unwrap();
    assert_eq!(Hnsw::open(&p).unwrap().calibration, h.calibration);
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
            assert_eq!(
                ids(&r.search(&all, qq, 10, 400, None)),
                brute(&all, DIM, qq, 10, |_| true)
            );
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
    // An upper-level list of the delta naming a node that does not reach that level (a search
    // would read that node's list there, which it does not have).
    let u32at = |o: usize| u32::from_le_bytes(good[o..o + 4].try_into().unwrap()) as usize;
    let u64at = |o: usize| u64::from_le_bytes(good[o..o + 8].try_into().unwrap()) as usize;
    let (m, base_n, n, np) = (u32at(12), u64at(24), u64at(32), u64at(40));
    let r8 = |x: usize| x.div_ceil(8) * 8;
    let o_off = 72 + r8(4 * np) + r8(n - base_n);
    let o_up = o_off + r8(4 * (np + n - base_n)) + r8(4 * (np + n - base_n) * (1 + 2 * m));
    let base_ulen = r.delta.as_ref().unwrap().base_ulen;
    let patched = r.base.as_ref().unwrap().patched.clone();
    let nodes: Vec<u32> = patched
        .iter()
        .copied()
        .chain(base_n as u32..n as u32)
        .collect();
    let (k, at) = nodes
        .iter()
        .enumerate()
        .filter(|&(_, &i)| r.levels[i as usize] >= 1)
        .map(|(k, _)| (k, o_up + (u32at(o_off + 4 * k) - base_ulen) * 4))
        .find(|&(_, at)| u32at(at) >= 1)
        .expect("a delta node above level 0 with a level-1 neighbour");
    let low = (0..n).find(|&j| r.levels[j] == 0).unwrap() as u32;
    let mut b = good.clone();
    b[at + 4..at + 8].copy_from_slice(&low.to_le_bytes());
    let e = try_open(&b).err().unwrap_or_else(|| {
        panic!(
            "delta node {} names level-0 node {low} at level 1",
            nodes[k]
        )
    });
    assert!(e.to_string().contains("below its level"), "{e}");
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
