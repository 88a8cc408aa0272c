//! Test support: servers started by pg.sh, one database per test, deterministic data.
#![allow(dead_code)]

use pgstore::pg::{RowRef, StoreMeta, id_from_hash, sq_l2};
use postgres::{Client, NoTls};

/// Ports of running servers: `PGSTORE_PORTS=coordinator,shard1,shard2[,spare]` (pg.sh start …).
pub fn ports() -> Option<Vec<u16>> {
    let s = std::env::var("PGSTORE_PORTS").ok()?;
    Some(
        s.split(',')
            .map(|p| p.trim().parse().expect("PGSTORE_PORTS: ports"))
            .collect(),
    )
}

/// A fresh database `name` on the server at `port`; returns its URL (without table=).
pub fn fresh_db(port: u16, name: &str) -> String {
    let mut admin = Client::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        NoTls,
    )
    .unwrap_or_else(|e| panic!("no server on port {port} (start it with pg.sh): {e}"));
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A synthetic collection: clustered vectors (so HNSW and filters behave like embeddings).
pub struct Data {
    pub dim: usize,
    pub vecs: Vec<f32>,
    pub paths: Vec<String>,
    pub classes: Vec<String>,
    pub hashes: Vec<Vec<u8>>,
    pub ids: Vec<i64>,
}

impl Data {
    pub fn new(n: usize, dim: usize, classes: usize, seed: u64) -> Data {
        let mut r = Rng::new(seed);
        let centers: Vec<f32> = (0..classes * dim).map(|_| r.f32()).collect();
        let mut vecs = Vec::with_capacity(n * dim);
        let (mut paths, mut cls, mut hashes, mut ids) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let c = (r.next() % classes as u64) as usize;
            for j in 0..dim {
                vecs.push(centers[c * dim + j] + 0.5 * r.f32());
            }
            paths.push(format!("class{c:03}/img{i:07}.jpg"));
            cls.push(format!("class{c:03}"));
            let mut h = [0u8; 32];
            for (k, b) in h.iter_mut().enumerate() {
                *b = ((r.next() >> (k % 8)) & 0xff) as u8;
            }
            ids.push(id_from_hash(&h));
            hashes.push(h.to_vec());
        }
        Data {
            dim,
            vecs,
            paths,
            classes: cls,
            hashes,
            ids,
        }
    }
    pub fn len(&self) -> usize {
        self.paths.len()
    }
    pub fn row(&self, i: usize) -> RowRef<'_> {
        RowRef {
            id: self.ids[i],
            path: &self.paths[i],
            class: &self.classes[i],
            content_hash: &self.hashes[i],
            embedding: &self.vecs[i * self.dim..(i + 1) * self.dim],
        }
    }
    pub fn meta(&self, model: &str) -> StoreMeta {
        StoreMeta {
            model: model.into(),
            size: 224,
            dim: self.dim,
            normalized: false,
            info: serde_json::json!({"model": model, "data": "synthetic"}),
        }
    }
    /// Brute-force f32 scan: (distance, id) of the k nearest rows passing `keep`, ties by id.
    pub fn brute(&self, q: &[f32], k: usize, keep: impl Fn(usize) -> bool) -> Vec<(f32, i64)> {
        let mut all: Vec<(f32, i64)> = (0..self.len())
            .filter(|&i| keep(i))
            .map(|i| {
                (
                    sq_l2(q, &self.vecs[i * self.dim..(i + 1) * self.dim])
                        .max(0.0)
                        .sqrt(),
                    self.ids[i],
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }
    pub fn query(&self, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        let i = (r.next() % self.len() as u64) as usize;
        (0..self.dim)
            .map(|j| self.vecs[i * self.dim + j] + 0.3 * r.f32())
            .collect()
    }
}
