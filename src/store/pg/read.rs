//! Reads: every row streamed (binary `COPY` out), the search SQL (exact, HNSW, filters; one
//! sub-select per shard so each returns only its top k), `EXPLAIN`, and the HNSW index.

use super::shard::shard_err;
use super::{EXACT_MARGIN, PgCtx, PgStore, Shard, StoredRow, like_prefix, lit, q, unreachable};
use anyhow::{Context, Result, bail};
use pgvector::Vector;
use postgres::Client;
use postgres::binary_copy::BinaryCopyOutIter;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};

/// `--where` filters, as SQL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `class = …`
    pub class: Option<String>,
    /// `path LIKE prefix%` (`%`, `_` and `\` in the prefix match literally).
    pub path_prefix: Option<String>,
}

/// pgvector 0.8's iterative index scans (`hnsw.iterative_scan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iterative {
    Off,
    Strict,
    Relaxed,
}

impl Iterative {
    fn guc(self) -> &'static str {
        match self {
            Iterative::Off => "off",
            Iterative::Strict => "strict_order",
            Iterative::Relaxed => "relaxed_order",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every row compared (no index); equals the local f32 scan.
    Exact,
    /// pgvector's HNSW index with `hnsw.ef_search = ef`.
    Hnsw { ef: u32, iterative: Iterative },
}

/// What a search returned: the rows, and the shards left out of a partial answer.
#[derive(Clone, Debug)]
pub struct Searched {
    pub rows: Vec<Candidate>,
    /// Shards that could not be reached and were skipped (only with `allow_partial`).
    pub missing: Vec<Shard>,
}

/// A row a search returned, with its vector (so the caller ranks it by deeprank's own distance).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: i64,
    pub path: String,
    pub class: String,
    pub class_name: String,
    pub embedding: Vec<f32>,
    /// pgvector's `<->` for the pair (sqrt of an f32 sum in pgvector's order, as double).
    pub pg_distance: f64,
}

impl PgStore {
    /// Streams every row, in id order, through `f` (binary COPY out: a fixed working set).
    pub fn for_each_row(&mut self, mut f: impl FnMut(StoredRow) -> Result<()>) -> Result<u64> {
        let types = self.types();
        let sql = format!(
            "COPY (SELECT id, path, class, class_name, content_hash, embedding FROM {} ORDER BY id) TO STDOUT (FORMAT binary)",
            q(&self.url.table)
        );
        let mut n = 0;
        let (shards, url) = (self.shards.clone(), self.url.clone());
        let reader = match self.client.copy_out(&sql) {
            Ok(r) => r,
            Err(e) => return Err(shard_err(&shards, &url, "reading rows", &e)),
        };
        let mut it = BinaryCopyOutIter::new(reader, &types);
        loop {
            let row = match it.next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    return Err(shard_err(&shards, &url, "reading rows", &e));
                }
            };
            let v: Vector = row.get(5);
            f(StoredRow {
                id: row.get(0),
                path: row.get(1),
                class: row.get(2),
                class_name: row.get(3),
                content_hash: row.get(4),
                embedding: v.to_vec(),
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Streams (id, path, content hash) of every row through `f`: what `sync` compares, without
    /// the vectors.
    pub fn for_each_key(
        &mut self,
        mut f: impl FnMut(i64, String, Vec<u8>) -> Result<()>,
    ) -> Result<u64> {
        let sql = format!(
            "COPY (SELECT id, path, content_hash FROM {}) TO STDOUT (FORMAT binary)",
            q(&self.url.table)
        );
        let (shards, url) = (self.shards.clone(), self.url.clone());
        let reader = self
            .client
            .copy_out(&sql)
            .map_err(|e| shard_err(&shards, &url, "reading rows", &e))?;
        let mut it = BinaryCopyOutIter::new(reader, &[Type::INT8, Type::TEXT, Type::BYTEA]);
        let mut n = 0;
        while let Some(row) = it
            .next()
            .map_err(|e| shard_err(&shards, &url, "reading rows", &e))?
        {
            f(row.get(0), row.get(1), row.get(2))?;
            n += 1;
        }
        Ok(n)
    }

    // ---------------------------------------------------------------- index

    /// Build pgvector's HNSW index (`vector_l2_ops`); on a sharded collection, on every shard.
    pub fn create_index(&mut self, m: u32, ef_construction: u32) -> Result<()> {
        if self.is_sharded() {
            for s in self.shards.clone() {
                let su = s.store_url(&self.url.table)?;
                let mut c = su
                    .connect()
                    .with_context(|| format!("shard {}", s.partition))?;
                build_index(&mut c, &self.url.table, m, ef_construction).with_context(|| {
                    format!("building the index on shard {} ({})", s.partition, s.url)
                })?;
            }
            Ok(())
        } else {
            build_index(&mut self.client, &self.url.table, m, ef_construction)
        }
    }

    /// On a sharded collection: the `hnsw.ef_search` (and iterative scan) the shards' sessions
    /// use, set through the foreign servers' libpq `options` (postgres_fdw passes no GUC of the
    /// coordinator's session on). Takes effect on the next remote connection (postgres_fdw drops
    /// cached connections when a server's options change).
    pub fn set_shard_search(&mut self, ef: u32, iterative: Iterative) -> Result<()> {
        let opt = format!(
            "-c hnsw.ef_search={ef} -c hnsw.iterative_scan={}",
            iterative.guc()
        );
        for s in self.shards.clone() {
            let has: bool = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_foreign_server, unnest(srvoptions) o
                     WHERE srvname = $1 AND o LIKE 'options=%')",
                    &[&s.server],
                )
                .pg("reading server options")?
                .get(0);
            let verb = if has { "SET" } else { "ADD" };
            self.client
                .batch_execute(&format!(
                    "ALTER SERVER {} OPTIONS ({verb} options {})",
                    q(&s.server),
                    lit(&opt)
                ))
                .pg("setting the shards' search options")?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- search

    /// The SQL of a search returning `fetch` rows: `$1` is the query vector, then the filters
    /// (class, LIKE pattern) in that order, where given.
    pub fn search_sql(&self, mode: Mode, filter: &Filter, fetch: usize) -> String {
        let all: Vec<&Shard> = self.shards.iter().collect();
        self.search_sql_over(mode, filter, fetch, &all)
    }

    /// [`PgStore::search_sql`] over some of the shards only (all of them when not sharded).
    fn search_sql_over(
        &self,
        mode: Mode,
        filter: &Filter,
        fetch: usize,
        parts: &[&Shard],
    ) -> String {
        let mut conds = Vec::new();
        let mut n = 1;
        if filter.class.is_some() {
            n += 1;
            conds.push(format!("class = ${n}"));
        }
        if filter.path_prefix.is_some() {
            n += 1;
            conds.push(format!("path LIKE ${n}"));
        }
        let wh = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        // Exact: the function form is no indexable ORDER BY, so no HNSW index is used, and `id`
        // breaks ties. HNSW: the operator alone, so the index provides the order.
        let (dist, order) = match mode {
            Mode::Exact => ("l2_distance(embedding, $1::vector)", "d, id"),
            Mode::Hnsw { .. } => ("embedding <-> $1::vector", "d"),
        };
        let one = |rel: &str| {
            format!(
                "SELECT id, path, class, class_name, embedding, {dist} AS d FROM {rel}{wh} ORDER BY {order} LIMIT {fetch}"
            )
        };
        if self.shards.is_empty() {
            one(&q(&self.url.table))
        } else {
            // One sub-select per foreign partition: postgres_fdw ships ORDER BY … LIMIT to each
            // shard (it ships no LIMIT for the partitioned parent). Ordering the union by `d + 0`
            // rather than `d` makes the planner use Append + Sort instead of Merge Append, and
            // Append runs the shards' scans concurrently (async_capable). Left-out shards (a
            // partial answer) are simply not in the union.
            let parts: Vec<String> = parts
                .iter()
                .map(|s| format!("({})", one(&q(&s.partition))))
                .collect();
            format!(
                "SELECT * FROM ({}) s ORDER BY d + 0, id LIMIT {fetch}",
                parts.join(" UNION ALL ")
            )
        }
    }

    /// The rows a search of the `k` nearest to `query` returns: in exact mode the nearest
    /// `k + EXACT_MARGIN` by pgvector's distance (ties by id), with HNSW the index's `k`. The
    /// caller ranks them by its own f32 distance (`search::store`), so that exact mode equals a
    /// local scan even where pgvector's summation order differs in the last bit.
    pub fn candidates(
        &mut self,
        query: &[f32],
        k: usize,
        mode: Mode,
        filter: &Filter,
    ) -> Result<Vec<Candidate>> {
        Ok(self.search(query, k, mode, filter, false)?.rows)
    }

    /// As [`PgStore::candidates`]; with `allow_partial` on a sharded store, a shard that cannot
    /// be reached is left out of the union and named in [`Searched::missing`] (the search is
    /// asked again of the others: one more round trip per shard down). An error that is not an
    /// unreachable shard, or every shard down, is still an error.
    pub fn search(
        &mut self,
        query: &[f32],
        k: usize,
        mode: Mode,
        filter: &Filter,
        allow_partial: bool,
    ) -> Result<Searched> {
        if query.len() != self.meta.dim {
            bail!(
                "query of dimension {} for a store of dimension {}",
                query.len(),
                self.meta.dim
            );
        }
        let mut missing: Vec<Shard> = Vec::new();
        if k == 0 {
            return Ok(Searched {
                rows: Vec::new(),
                missing,
            });
        }
        let fetch = match mode {
            Mode::Exact => k + EXACT_MARGIN,
            Mode::Hnsw { .. } => k,
        };
        let qv = Vector::from(query.to_vec());
        let like = filter.path_prefix.as_deref().map(like_prefix);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&qv];
        if let Some(c) = &filter.class {
            params.push(c);
        }
        if let Some(l) = &like {
            params.push(l);
        }
        let sharded = self.is_sharded();
        loop {
            let parts: Vec<&Shard> = self
                .shards
                .iter()
                .filter(|s| !missing.iter().any(|m| m.partition == s.partition))
                .collect();
            let sql = self.search_sql_over(mode, filter, fetch, &parts);
            let res = (|| {
                let mut tx = self.client.transaction()?;
                if let Mode::Hnsw { ef, iterative } = mode
                    && !sharded
                {
                    tx.batch_execute(&hnsw_settings(ef, iterative, filter))?;
                }
                let rows = tx.query(&sql, &params)?;
                tx.commit()?;
                Ok(rows)
            })();
            let rows = match res {
                Ok(rows) => rows,
                Err(e) => {
                    let err = self.qerr("search", e);
                    let down = unreachable(&err)
                        .and_then(|u| u.shard.clone())
                        .and_then(|p| self.shards.iter().find(|s| s.partition == p).cloned());
                    match down {
                        Some(s) if allow_partial && missing.len() + 1 < self.shards.len() => {
                            missing.push(s);
                            continue;
                        }
                        _ => return Err(err),
                    }
                }
            };
            let rows = rows
                .into_iter()
                .map(|r| {
                    let v: Vector = r.get(4);
                    Candidate {
                        id: r.get(0),
                        path: r.get(1),
                        class: r.get(2),
                        class_name: r.get(3),
                        embedding: v.to_vec(),
                        pg_distance: r.get(5),
                    }
                })
                .collect();
            return Ok(Searched { rows, missing });
        }
    }

    /// The row with this id, if any.
    pub fn get(&mut self, id: i64) -> Result<Option<StoredRow>> {
        let sql = format!(
            "SELECT id, path, class, class_name, content_hash, embedding FROM {} WHERE id = $1",
            q(&self.url.table)
        );
        let row = self
            .client
            .query_opt(&sql, &[&id])
            .map_err(|e| self.qerr("reading a row", e))?;
        Ok(row.map(|r| {
            let v: Vector = r.get(5);
            StoredRow {
                id: r.get(0),
                path: r.get(1),
                class: r.get(2),
                class_name: r.get(3),
                content_hash: r.get(4),
                embedding: v.to_vec(),
            }
        }))
    }

    /// Some row's id (the first at or after `from`, else the first): ids are hashes of the
    /// content, so a random `from` picks a random row through the primary key.
    pub fn id_near(&mut self, from: i64) -> Result<Option<i64>> {
        let t = q(&self.url.table);
        let sql = format!(
            "(SELECT id FROM {t} WHERE id >= $1 ORDER BY id LIMIT 1)
             UNION ALL (SELECT id FROM {t} ORDER BY id LIMIT 1) LIMIT 1"
        );
        let row = self
            .client
            .query_opt(&sql, &[&from])
            .map_err(|e| self.qerr("picking a row", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Whether the connection to the server is closed (a server restart: open a new one).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// `EXPLAIN (VERBOSE, ANALYZE, …)` of the search SQL, as text (to record plans).
    pub fn explain_search(
        &mut self,
        query: &[f32],
        k: usize,
        mode: Mode,
        filter: &Filter,
    ) -> Result<String> {
        let fetch = match mode {
            Mode::Exact => k + EXACT_MARGIN,
            Mode::Hnsw { .. } => k,
        };
        let sql = format!(
            "EXPLAIN (VERBOSE, ANALYZE, COSTS OFF, BUFFERS OFF) {}",
            self.search_sql(mode, filter, fetch)
        );
        let qv = Vector::from(query.to_vec());
        let like = filter.path_prefix.as_deref().map(like_prefix);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&qv];
        if let Some(c) = &filter.class {
            params.push(c);
        }
        if let Some(l) = &like {
            params.push(l);
        }
        let mut tx = self.client.transaction().pg("begin")?;
        if let Mode::Hnsw { ef, iterative } = mode {
            tx.batch_execute(&hnsw_settings(ef, iterative, filter))
                .pg("set")?;
        }
        let rows = tx.query(&sql, &params).pg("explain")?;
        tx.commit().pg("commit")?;
        Ok(abbreviate_vectors(
            &rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"),
        ))
    }
}

/// Session settings of an HNSW search. Without filters the index is forced: pgvector's cost
/// estimate grows with ef_search and PostgreSQL does not count the cost of de-TOASTing vectors
/// (over ~2 KB, i.e. dim > ~500, they live out of line), so at 100k × 1280-d and ef=100 the planner
/// picked a 1 s sequential scan over a 5 ms index scan. With filters the planner keeps the choice:
/// a selective filter is often served better by scanning and sorting the matching rows.
fn hnsw_settings(ef: u32, iterative: Iterative, filter: &Filter) -> String {
    let mut s = format!(
        "SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = {}",
        iterative.guc()
    );
    if filter.class.is_none() && filter.path_prefix.is_none() {
        s.push_str("; SET LOCAL enable_seqscan = off");
    }
    s
}

/// Shorten vector literals (`'[0.1,0.2,…]'`) in a plan to `'[…]'`.
pub fn abbreviate_vectors(plan: &str) -> String {
    let mut out = String::with_capacity(plan.len());
    let mut rest = plan;
    while let Some(i) = rest.find("'[") {
        out.push_str(&rest[..i]);
        match rest[i..].find("]'") {
            Some(j) if j > 40 => {
                out.push_str("'[…]'");
                rest = &rest[i + j + 2..];
            }
            _ => {
                out.push_str("'[");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}
pub(super) fn build_index(c: &mut Client, t: &str, m: u32, efc: u32) -> Result<()> {
    // The graph must fit maintenance_work_mem or the build slows down a lot (pgvector warns).
    c.batch_execute(&format!(
        "SET maintenance_work_mem = '2GB'; SET max_parallel_maintenance_workers = 2;
         CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_l2_ops) WITH (m = {m}, ef_construction = {efc})",
        q(&format!("{t}_hnsw")),
        q(t)
    ))
    .pg(&format!("creating the HNSW index on {t}"))
}
