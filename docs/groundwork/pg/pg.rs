//! A collection in PostgreSQL + pgvector: one table per collection, a metadata row beside it,
//! binary `COPY` writes that are idempotent by content hash, streaming reads, exact and HNSW search
//! with filters, and a sharded layout (a hash-partitioned table on a coordinator whose partitions
//! are postgres_fdw foreign tables on shard servers).
//!
//! Store URL: `postgres://user@host:port/dbname?table=photos` (any libpq URL; `table` is ours and
//! is removed before connecting, default `deeprank`).
//!
//! Layout of collection `t`:
//! - `t (id bigint primary key, path text, class text, content_hash bytea unique, embedding vector(dim))`
//! - `t_meta`: one row (model identity, input size, dim, normalisation, and the full meta as JSON).
//! - sharded: on the coordinator `t` is `PARTITION BY HASH (id)` with foreign partitions `t_p<i>`
//!   on servers `t_s<i>`; each shard holds a plain `t` (same columns, constraints, HNSW index).
//!   Ids derived from the content hash ([`id_from_hash`]) put equal content on the same shard, so
//!   the per-shard unique constraint on `content_hash` is a global one.
//!
//! The client is the synchronous `postgres` crate (tokio-postgres driven by its own
//! current-thread runtime): call it from std threads or `spawn_blocking`, never directly from an
//! async task (it panics inside a tokio runtime).

use anyhow::{Context, Result, anyhow, bail};
use pgvector::Vector;
use postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutIter};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, Config, NoTls};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::str::FromStr;

/// Default collection (table) name when the URL has no `table=`.
pub const DEFAULT_TABLE: &str = "deeprank";
/// Extra rows fetched in exact mode beyond `k`, re-ranked with the local f32 distance so that the
/// answer equals the local scan even where pgvector's summation order differs in the last bit.
pub const EXACT_MARGIN: usize = 8;

// ---------------------------------------------------------------------------------------------
// URL

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    /// The URL as given (for messages).
    pub url: String,
    /// The connection URL without `table=`.
    pub conn: String,
    /// The collection's table name (a validated identifier).
    pub table: String,
}

/// Whether a `--db` argument names a PostgreSQL store rather than a folder.
pub fn is_store_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Lower-case identifier: letter or `_` first, then letters, digits, `_`; at most 40 bytes so
/// `<table>_meta`, `<table>_p<i>`, `<table>_hnsw` stay under PostgreSQL's 63.
pub fn valid_table(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        bail!(
            "invalid table name {name:?}: use 1-40 characters of a-z, 0-9 and _, not starting with a digit"
        );
    }
    Ok(())
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl> {
        if !is_store_url(url) {
            bail!("not a PostgreSQL URL (postgres://user@host:port/dbname?table=name): {url}");
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut table = None;
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("table", v)) => {
                    if table.replace(v.to_string()).is_some() {
                        bail!("{url}: table= given twice");
                    }
                }
                _ => rest.push(kv),
            }
        }
        let table = table.unwrap_or_else(|| DEFAULT_TABLE.to_string());
        valid_table(&table).with_context(|| format!("store URL {url}"))?;
        let conn = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        // Let the driver validate the rest now, so a bad URL fails before any work.
        Config::from_str(&conn).map_err(|e| anyhow!("bad store URL {url}: {e}"))?;
        Ok(StoreUrl {
            url: url.to_string(),
            conn,
            table,
        })
    }

    pub fn connect(&self) -> Result<Client> {
        let cfg =
            Config::from_str(&self.conn).map_err(|e| anyhow!("bad store URL {}: {e}", self.url))?;
        cfg.connect(NoTls)
            .map_err(|e| anyhow!("cannot connect to {}: {}", self.url, pg_err(&e)))
    }
}

/// Double-quoted identifier (names are validated, quoting keeps reserved words safe).
fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Full text of a driver error: message, detail and hint of a server error.
pub fn pg_err(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                let _ = write!(s, " ({d})");
            }
            if let Some(h) = db.hint() {
                let _ = write!(s, " hint: {h}");
            }
            s
        }
        None => e.to_string(),
    }
}

trait PgCtx<T> {
    fn pg(self, what: &str) -> Result<T>;
}
impl<T> PgCtx<T> for std::result::Result<T, postgres::Error> {
    fn pg(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {}", pg_err(&e)))
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata, rows

/// What produced the vectors (the identity check of a DB folder's meta.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreMeta {
    /// Model identity, e.g. `efficientnet-lite0-imagenet:57934424:pooled`.
    pub model: String,
    /// Input side in pixels.
    pub size: u32,
    pub dim: usize,
    pub normalized: bool,
    /// Anything else (deeprank's full `db::Meta`), kept as JSON.
    pub info: serde_json::Value,
}

impl StoreMeta {
    /// Why a store holding `self` cannot take vectors from `other`, if it cannot.
    pub fn mismatch(&self, other: &StoreMeta) -> Option<String> {
        if self.model != other.model {
            return Some(format!("model {:?}, not {:?}", self.model, other.model));
        }
        if self.dim != other.dim || self.size != other.size || self.normalized != other.normalized {
            return Some(format!(
                "dim {} size {} normalized {}, not dim {} size {} normalized {}",
                self.dim, self.size, self.normalized, other.dim, other.size, other.normalized
            ));
        }
        None
    }
}

/// A row to write (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct RowRef<'a> {
    pub id: i64,
    pub path: &'a str,
    pub class: &'a str,
    pub content_hash: &'a [u8],
    pub embedding: &'a [f32],
}

/// A row read back.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRow {
    pub id: i64,
    pub path: String,
    pub class: String,
    pub content_hash: Vec<u8>,
    pub embedding: Vec<f32>,
}

/// A stable id from a content hash (its first 8 bytes, big-endian, sign bit cleared): equal
/// content gets the same id on every worker, so re-runs and concurrent writers agree, and (hash
/// partitioning by id) equal content always lands on the same shard.
pub fn id_from_hash(hash: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = hash.len().min(8);
    b[..n].copy_from_slice(&hash[..n]);
    (u64::from_be_bytes(b) & (i64::MAX as u64)) as i64
}

/// How a batch is made idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// COPY into a temporary table, then `INSERT … SELECT … ON CONFLICT DO NOTHING`.
    Stage,
    /// Look the batch's hashes up first, COPY only the new rows straight into the table (falls
    /// back to `Stage` for the batch if a concurrent writer got there in between).
    CheckThenCopy,
    /// Sharded collections only: ask the coordinator which partition each row belongs to
    /// (`satisfies_hash_partition`), then `CheckThenCopy` straight into each shard over its own
    /// connection, in binary (postgres_fdw moves rows as text, a lot slower for vectors).
    /// One transaction per batch and shard; no atomicity across shards (re-runs are idempotent).
    DirectToShards,
}

// ---------------------------------------------------------------------------------------------
// Search

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

#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: i64,
    pub path: String,
    pub class: String,
    /// L2 distance computed here in f32 (the local DB's function), from the stored vector.
    pub distance: f32,
    /// pgvector's `<->` for the same pair (sqrt of an f32 sum, in double).
    pub pg_distance: f64,
}

/// Squared L2 distance exactly as deeprank's local scan computes it (src/index.rs `sq_l2`: eight
/// f32 accumulators, then the remainder). The lead should call the crate's own function instead.
pub fn sq_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        s += d * d;
    }
    s
}

fn like_prefix(p: &str) -> String {
    let mut s = String::with_capacity(p.len() + 1);
    for c in p.chars() {
        if matches!(c, '%' | '_' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('%');
    s
}

// ---------------------------------------------------------------------------------------------
// The store

/// A foreign partition of a sharded collection.
#[derive(Clone, Debug)]
pub struct Shard {
    pub partition: String,
    pub server: String,
    /// `postgres://user@host:port/dbname` from the server's options and user mapping.
    pub url: String,
    /// Hash partition bound: rows with `hash(id) % modulus == remainder` live here.
    pub modulus: i32,
    pub remainder: i32,
}

pub struct PgStore {
    client: Client,
    url: StoreUrl,
    meta: StoreMeta,
    /// Empty for a plain table; the foreign partitions when sharded.
    shards: Vec<Shard>,
    /// Direct connections to the shards (WriteMode::DirectToShards), opened on first use.
    shard_clients: Vec<Option<(Client, Type)>>,
    stage_ready: bool,
    vector_type: Type,
    pub write_mode: WriteMode,
    pub batch_rows: usize,
    pending: Vec<(i64, String, String, Vec<u8>, Vector)>,
}

fn meta_ddl(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            model text NOT NULL, size integer NOT NULL, dim integer NOT NULL,
            normalized boolean NOT NULL, info jsonb NOT NULL)",
        q(&format!("{t}_meta"))
    )
}

/// Largest dimension whose vectors are stored in line (PLAIN) rather than TOASTed: a row must fit
/// an 8 KB page, and the vector (8 + 4·dim bytes) is the part that cannot move out of line.
pub const PLAIN_MAX_DIM: usize = 1800;

fn table_ddl(t: &str, dim: usize) -> String {
    // PLAIN storage: pgvector's default (EXTERNAL) moves vectors over ~2 KB (dim > ~500) to the
    // TOAST table, and an exact scan then costs a TOAST index lookup per row (2.6× slower at
    // 1280-d). The btree indexes serve the --where filters (class =, path LIKE 'prefix%').
    let plain = if dim <= PLAIN_MAX_DIM {
        format!(
            "ALTER TABLE {} ALTER COLUMN embedding SET STORAGE PLAIN;",
            q(t)
        )
    } else {
        String::new()
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {tq} (
            id bigint PRIMARY KEY, path text NOT NULL, class text NOT NULL,
            content_hash bytea NOT NULL UNIQUE, embedding vector({dim}) NOT NULL);
         {plain}
         CREATE INDEX IF NOT EXISTS {ci} ON {tq} (class);
         CREATE INDEX IF NOT EXISTS {pi} ON {tq} (path text_pattern_ops);",
        tq = q(t),
        ci = q(&format!("{t}_class")),
        pi = q(&format!("{t}_path")),
    )
}

fn read_meta(c: &mut Client, url: &StoreUrl) -> Result<Option<StoreMeta>> {
    let mt = format!("{}_meta", url.table);
    let exists: bool = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&q(&mt)])
        .pg(&format!("{}: reading the catalog", url.url))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = c
        .query_opt(
            &format!(
                "SELECT model, size, dim, normalized, info::text FROM {}",
                q(&mt)
            ),
            &[],
        )
        .pg(&format!("{}: reading {mt}", url.url))?;
    let Some(r) = row else { return Ok(None) };
    let info: String = r.get(4);
    Ok(Some(StoreMeta {
        model: r.get(0),
        size: r.get::<_, i32>(1) as u32,
        dim: r.get::<_, i32>(2) as usize,
        normalized: r.get(3),
        info: serde_json::from_str(&info).context("meta info is not JSON")?,
    }))
}

fn write_meta(tx: &mut postgres::Transaction<'_>, t: &str, m: &StoreMeta) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO {} (model, size, dim, normalized, info) VALUES ($1, $2, $3, $4, $5::text::jsonb)",
            q(&format!("{t}_meta"))
        ),
        &[&m.model, &(m.size as i32), &(m.dim as i32), &m.normalized, &m.info.to_string()],
    )
    .pg("writing the meta row")?;
    Ok(())
}

/// Serialise concurrent `create`/`init` of one collection (advisory lock on the table name).
fn lock_name(tx: &mut postgres::Transaction<'_>, t: &str) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("deeprank:{t}")],
    )
    .pg("taking the collection lock")?;
    Ok(())
}

fn refuse(url: &StoreUrl, have: &StoreMeta, why: &str) -> anyhow::Error {
    anyhow!(
        "store {} holds vectors of {why}; it was embedded with another model (its model: {}, dim {}). \
         Use another table= or the same model",
        url.url,
        have.model,
        have.dim
    )
}

impl PgStore {
    /// Open collection `url`, creating it (extension, table, meta row) if it does not exist.
    /// An existing collection made with another model is refused.
    pub fn create(url: &str, meta: &StoreMeta) -> Result<PgStore> {
        let u = StoreUrl::parse(url)?;
        let mut c = u.connect()?;
        {
            let mut tx = c.transaction().pg("begin")?;
            lock_name(&mut tx, &u.table)?;
            tx.batch_execute("CREATE EXTENSION IF NOT EXISTS vector").map_err(|e| {
                anyhow!(
                    "{}: CREATE EXTENSION vector failed: {} (pgvector must be installed on the server; \
                     a non-superuser needs it created once by an administrator)",
                    u.url,
                    pg_err(&e)
                )
            })?;
            tx.batch_execute(&meta_ddl(&u.table))
                .pg("creating the meta table")?;
            let have = tx
                .query_opt(
                    &format!(
                        "SELECT model, size, dim, normalized FROM {}",
                        q(&format!("{}_meta", u.table))
                    ),
                    &[],
                )
                .pg("reading the meta row")?;
            match have {
                Some(r) => {
                    let have = StoreMeta {
                        model: r.get(0),
                        size: r.get::<_, i32>(1) as u32,
                        dim: r.get::<_, i32>(2) as usize,
                        normalized: r.get(3),
                        info: serde_json::Value::Null,
                    };
                    if let Some(why) = have.mismatch(meta) {
                        return Err(refuse(&u, &have, &why));
                    }
                }
                None => {
                    tx.batch_execute(&table_ddl(&u.table, meta.dim))
                        .pg("creating the table")?;
                    write_meta(&mut tx, &u.table, meta)?;
                }
            }
            tx.commit().pg("commit")?;
        }
        Self::from_client(c, u, Some(meta))
    }

    /// Open an existing collection; `expect` (the querying model) must match its meta.
    pub fn open(url: &str, expect: Option<&StoreMeta>) -> Result<PgStore> {
        let u = StoreUrl::parse(url)?;
        let c = u.connect()?;
        Self::from_client(c, u, expect)
    }

    fn from_client(mut c: Client, u: StoreUrl, expect: Option<&StoreMeta>) -> Result<PgStore> {
        let meta = read_meta(&mut c, &u)?.ok_or_else(|| {
            anyhow!(
                "{}: no deeprank collection {:?} there (embed into it or `store init` first)",
                u.url,
                u.table
            )
        })?;
        if let Some(e) = expect
            && let Some(why) = meta.mismatch(e)
        {
            return Err(refuse(&u, &meta, &why));
        }
        let kind: i8 = c
            .query_one(
                "SELECT relkind::\"char\" FROM pg_class WHERE oid = to_regclass($1)",
                &[&q(&u.table)],
            )
            .pg("reading the catalog")?
            .get(0);
        let shards = if kind as u8 == b'p' {
            list_shards(&mut c, &u.table)?
        } else {
            Vec::new()
        };
        let vector_type = c
            .prepare(&format!("SELECT embedding FROM {} LIMIT 0", q(&u.table)))
            .pg("preparing")?
            .columns()[0]
            .type_()
            .clone();
        Ok(PgStore {
            client: c,
            url: u,
            meta,
            shards,
            stage_ready: false,
            vector_type,
            write_mode: WriteMode::Stage,
            batch_rows: 2000,
            pending: Vec::new(),
            shard_clients: Vec::new(),
        })
    }

    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
    pub fn is_sharded(&self) -> bool {
        !self.shards.is_empty()
    }
    /// The underlying connection (for tests, EXPLAIN and administration).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Turn an error from a query into one that names the unreachable shard, if that is the cause.
    fn qerr(&self, what: &str, e: postgres::Error) -> anyhow::Error {
        shard_err(&self.shards, &self.url, what, &pg_err(&e))
    }

    pub fn count(&mut self) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", q(&self.url.table));
        self.client
            .query_one(&sql, &[])
            .map(|r| r.get(0))
            .map_err(|e| self.qerr("count", e))
    }

    // ---------------------------------------------------------------- writes

    /// Which of `hashes` are stored already (to skip them before embedding).
    pub fn stored_hashes(&mut self, hashes: &[&[u8]]) -> Result<HashSet<Vec<u8>>> {
        let sql = format!(
            "SELECT content_hash FROM {} WHERE content_hash = ANY($1)",
            q(&self.url.table)
        );
        let rows = self
            .client
            .query(&sql, &[&hashes])
            .map_err(|e| self.qerr("looking up hashes", e))?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Queue a row; every `batch_rows` rows are written in one transaction. Returns the number
    /// of rows newly stored by a batch written now (0 while queueing).
    pub fn push(&mut self, row: RowRef<'_>) -> Result<u64> {
        if row.embedding.len() != self.meta.dim {
            bail!(
                "vector of dimension {} for a store of dimension {}",
                row.embedding.len(),
                self.meta.dim
            );
        }
        self.pending.push((
            row.id,
            row.path.to_string(),
            row.class.to_string(),
            row.content_hash.to_vec(),
            Vector::from(row.embedding.to_vec()),
        ));
        if self.pending.len() >= self.batch_rows {
            self.flush()
        } else {
            Ok(0)
        }
    }

    /// Write the queued rows (one transaction). Returns how many were new.
    pub fn flush(&mut self) -> Result<u64> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let rows = std::mem::take(&mut self.pending);
        let n = match self.write_mode {
            WriteMode::Stage => self.write_staged(&rows)?,
            WriteMode::CheckThenCopy => self.write_checked(&rows)?,
            WriteMode::DirectToShards if self.is_sharded() => self.write_direct(&rows)?,
            WriteMode::DirectToShards => self.write_checked(&rows)?,
        };
        Ok(n)
    }

    fn types(&self) -> [Type; 5] {
        [
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::BYTEA,
            self.vector_type.clone(),
        ]
    }

    fn copy_rows(
        tx: &mut postgres::Transaction<'_>,
        target: &str,
        types: &[Type],
        rows: &[&(i64, String, String, Vec<u8>, Vector)],
    ) -> std::result::Result<u64, postgres::Error> {
        let sink = tx.copy_in(&format!(
            "COPY {target} (id, path, class, content_hash, embedding) FROM STDIN (FORMAT binary)"
        ))?;
        let mut w = BinaryCopyInWriter::new(sink, types);
        for (id, p, c, h, v) in rows {
            w.write(&[id, p, c, h, v])?;
        }
        w.finish()
    }

    fn write_staged(&mut self, rows: &[(i64, String, String, Vec<u8>, Vector)]) -> Result<u64> {
        let t = q(&self.url.table);
        if !self.stage_ready {
            self.client
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS deeprank_stage
                     (id bigint, path text, class text, content_hash bytea, embedding vector) ON COMMIT DELETE ROWS",
                )
                .map_err(|e| self.qerr("creating the staging table", e))?;
            self.stage_ready = true;
        }
        let types = self.types();
        let refs: Vec<_> = rows.iter().collect();
        let res = (|| {
            let mut tx = self.client.transaction()?;
            Self::copy_rows(&mut tx, "deeprank_stage", &types, &refs)?;
            // DISTINCT ON: a batch may itself hold the same content twice.
            let n = tx.execute(
                &format!(
                    "INSERT INTO {t} (id, path, class, content_hash, embedding)
                     SELECT DISTINCT ON (content_hash) id, path, class, content_hash, embedding
                     FROM deeprank_stage ON CONFLICT DO NOTHING"
                ),
                &[],
            )?;
            tx.commit()?;
            Ok(n)
        })();
        res.map_err(|e| self.qerr("writing a batch", e))
    }

    fn write_checked(&mut self, rows: &[(i64, String, String, Vec<u8>, Vector)]) -> Result<u64> {
        let hashes: Vec<&[u8]> = rows.iter().map(|r| r.3.as_slice()).collect();
        let have = self.stored_hashes(&hashes)?;
        let mut seen = HashSet::new();
        let new: Vec<_> = rows
            .iter()
            .filter(|r| !have.contains(&r.3) && seen.insert(r.3.as_slice()))
            .collect();
        if new.is_empty() {
            return Ok(0);
        }
        let types = self.types();
        let t = q(&self.url.table);
        let res = (|| -> std::result::Result<u64, postgres::Error> {
            let mut tx = self.client.transaction()?;
            let n = Self::copy_rows(&mut tx, &t, &types, &new)?;
            tx.commit()?;
            Ok(n)
        })();
        match res {
            Ok(n) => Ok(n),
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                // A concurrent writer stored some of them in between: redo the batch the safe way.
                self.write_staged(rows)
            }
            Err(e) => Err(self.qerr("writing a batch", e)),
        }
    }

    fn write_direct(&mut self, rows: &[(i64, String, String, Vec<u8>, Vector)]) -> Result<u64> {
        // Which partition holds each id: PostgreSQL's own hash, asked of the coordinator.
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let mods: Vec<i32> = self.shards.iter().map(|s| s.modulus).collect();
        let rems: Vec<i32> = self.shards.iter().map(|s| s.remainder).collect();
        let sql =
            "SELECT (SELECT p.i FROM unnest($3::int[], $4::int[]) WITH ORDINALITY AS p(m, r, i)
                            WHERE satisfies_hash_partition($1::text::regclass, p.m, p.r, id))::int
                   FROM unnest($2::bigint[]) WITH ORDINALITY AS u(id, o) ORDER BY o";
        let parent = q(&self.url.table);
        let route = self
            .client
            .query(sql, &[&parent, &ids, &mods, &rems])
            .map_err(|e| self.qerr("routing a batch", e))?;
        if self.shard_clients.len() != self.shards.len() {
            self.shard_clients = (0..self.shards.len()).map(|_| None).collect();
        }
        let mut total = 0;
        for (si, shard) in self.shards.clone().iter().enumerate() {
            let mine: Vec<&(i64, String, String, Vec<u8>, Vector)> = rows
                .iter()
                .zip(&route)
                .filter(|(_, r)| r.get::<_, Option<i32>>(0) == Some(si as i32 + 1))
                .map(|(row, _)| row)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let what = format!("writing to shard {} ({})", shard.partition, shard.url);
            if self.shard_clients[si].is_none() {
                let su = StoreUrl::parse(&shard.url)?;
                let mut c = su.connect().context(what.clone())?;
                let ty = c
                    .prepare(&format!(
                        "SELECT embedding FROM {} LIMIT 0",
                        q(&self.url.table)
                    ))
                    .pg(&what)?
                    .columns()[0]
                    .type_()
                    .clone();
                self.shard_clients[si] = Some((c, ty));
            }
            let (c, ty) = self.shard_clients[si].as_mut().unwrap();
            let types = [Type::INT8, Type::TEXT, Type::TEXT, Type::BYTEA, ty.clone()];
            let t = q(&self.url.table);
            let res = (|| -> std::result::Result<u64, postgres::Error> {
                let hashes: Vec<&[u8]> = mine.iter().map(|r| r.3.as_slice()).collect();
                let mut tx = c.transaction()?;
                let have: HashSet<Vec<u8>> = tx
                    .query(
                        &format!("SELECT content_hash FROM {t} WHERE content_hash = ANY($1)"),
                        &[&hashes],
                    )?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut seen = HashSet::new();
                let new: Vec<_> = mine
                    .iter()
                    .copied()
                    .filter(|r| !have.contains(&r.3) && seen.insert(r.3.as_slice()))
                    .collect();
                let n = if new.is_empty() {
                    0
                } else {
                    Self::copy_rows(&mut tx, &t, &types, &new)?
                };
                tx.commit()?;
                Ok(n)
            })();
            match res {
                Ok(n) => total += n,
                Err(e) => {
                    // Drop the connection: it may be broken (shard restarted).
                    self.shard_clients[si] = None;
                    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                        // A concurrent writer: redo this shard's rows through the coordinator.
                        let owned: Vec<_> = mine.into_iter().cloned().collect();
                        total += self.write_staged(&owned)?;
                    } else {
                        bail!("{what}: {}", pg_err(&e));
                    }
                }
            }
        }
        Ok(total)
    }

    /// Delete rows by path. Returns how many went.
    pub fn remove_paths(&mut self, paths: &[&str]) -> Result<u64> {
        let sql = format!("DELETE FROM {} WHERE path = ANY($1)", q(&self.url.table));
        self.client
            .execute(&sql, &[&paths])
            .map_err(|e| self.qerr("removing", e))
    }

    // ---------------------------------------------------------------- reads

    /// Stream every row, in id order, through `f` (binary COPY out: a fixed working set).
    pub fn for_each_row(&mut self, mut f: impl FnMut(StoredRow) -> Result<()>) -> Result<u64> {
        let types = self.types();
        let sql = format!(
            "COPY (SELECT id, path, class, content_hash, embedding FROM {} ORDER BY id) TO STDOUT (FORMAT binary)",
            q(&self.url.table)
        );
        let mut n = 0;
        let (shards, url) = (self.shards.clone(), self.url.clone());
        let reader = match self.client.copy_out(&sql) {
            Ok(r) => r,
            Err(e) => return Err(shard_err(&shards, &url, "reading rows", &pg_err(&e))),
        };
        let mut it = BinaryCopyOutIter::new(reader, &types);
        loop {
            let row = match it.next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    return Err(shard_err(&shards, &url, "reading rows", &pg_err(&e)));
                }
            };
            let v: Vector = row.get(4);
            f(StoredRow {
                id: row.get(0),
                path: row.get(1),
                class: row.get(2),
                content_hash: row.get(3),
                embedding: v.to_vec(),
            })?;
            n += 1;
        }
        Ok(n)
    }

    // ---------------------------------------------------------------- index

    /// Build pgvector's HNSW index (`vector_l2_ops`); on a sharded collection, on every shard.
    pub fn create_index(&mut self, m: u32, ef_construction: u32) -> Result<()> {
        if self.is_sharded() {
            for s in self.shards.clone() {
                let su = StoreUrl::parse(&format!("{}?table={}", s.url, self.url.table))?;
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
                "SELECT id, path, class, embedding, {dist} AS d FROM {rel}{wh} ORDER BY {order} LIMIT {fetch}"
            )
        };
        if self.shards.is_empty() {
            one(&q(&self.url.table))
        } else {
            // One sub-select per foreign partition: postgres_fdw ships ORDER BY … LIMIT to each
            // shard (it ships no LIMIT for the partitioned parent). Ordering the union by `d + 0`
            // rather than `d` makes the planner use Append + Sort instead of Merge Append, and
            // Append runs the shards' scans concurrently (async_capable).
            let parts: Vec<String> = self
                .shards
                .iter()
                .map(|s| format!("({})", one(&q(&s.partition))))
                .collect();
            format!(
                "SELECT * FROM ({}) s ORDER BY d + 0, id LIMIT {fetch}",
                parts.join(" UNION ALL ")
            )
        }
    }

    /// The `k` nearest rows to `query`, nearest first. Distances are recomputed here in f32 from
    /// the stored vectors (deeprank's own function), and the answer re-ranked by (distance, id):
    /// in exact mode it equals a local f32 scan of the same rows.
    pub fn search(
        &mut self,
        query: &[f32],
        k: usize,
        mode: Mode,
        filter: &Filter,
    ) -> Result<Vec<Hit>> {
        if query.len() != self.meta.dim {
            bail!(
                "query of dimension {} for a store of dimension {}",
                query.len(),
                self.meta.dim
            );
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let fetch = match mode {
            Mode::Exact => k + EXACT_MARGIN,
            Mode::Hnsw { .. } => k,
        };
        let sql = self.search_sql(mode, filter, fetch);
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
        let rows = res.map_err(|e| self.qerr("search", e))?;
        let mut hits: Vec<Hit> = rows
            .into_iter()
            .map(|r| {
                let v: Vector = r.get(3);
                Hit {
                    id: r.get(0),
                    path: r.get(1),
                    class: r.get(2),
                    distance: sq_l2(query, v.as_slice()).max(0.0).sqrt(),
                    pg_distance: r.get(4),
                }
            })
            .collect();
        hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
        hits.truncate(k);
        Ok(hits)
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

fn shard_err(shards: &[Shard], url: &StoreUrl, what: &str, text: &str) -> anyhow::Error {
    for s in shards {
        if text.contains(&format!("\"{}\"", s.server)) {
            return anyhow!(
                "{what}: shard {} ({}, foreign server {}) failed: {text}",
                s.partition,
                s.url,
                s.server
            );
        }
    }
    anyhow!("{what} on {}: {text}", url.url)
}

fn build_index(c: &mut Client, t: &str, m: u32, efc: u32) -> Result<()> {
    // The graph must fit maintenance_work_mem or the build slows down a lot (pgvector warns).
    c.batch_execute(&format!(
        "SET maintenance_work_mem = '2GB'; SET max_parallel_maintenance_workers = 2;
         CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_l2_ops) WITH (m = {m}, ef_construction = {efc})",
        q(&format!("{t}_hnsw")),
        q(t)
    ))
    .pg(&format!("creating the HNSW index on {t}"))
}

fn list_shards(c: &mut Client, t: &str) -> Result<Vec<Shard>> {
    let rows = c
        .query(
            "SELECT ch.relname::text, s.srvname::text, pg_get_expr(ch.relpartbound, ch.oid),
                    (SELECT array_agg(o) FROM unnest(s.srvoptions) o),
                    (SELECT array_agg(o) FROM pg_user_mappings um, unnest(um.umoptions) o
                      WHERE um.srvid = s.oid AND um.usename IN (current_user, 'public'))
             FROM pg_inherits i
             JOIN pg_class ch ON ch.oid = i.inhrelid
             JOIN pg_foreign_table ft ON ft.ftrelid = ch.oid
             JOIN pg_foreign_server s ON s.oid = ft.ftserver
             WHERE i.inhparent = to_regclass($1)
             ORDER BY ch.oid",
            &[&q(t)],
        )
        .pg("listing the shards")?;
    let opt = |v: &Option<Vec<String>>, k: &str| -> Option<String> {
        v.as_ref()?
            .iter()
            .find_map(|o| o.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            let bound: String = r.get(2);
            let so: Option<Vec<String>> = r.get(3);
            let uo: Option<Vec<String>> = r.get(4);
            // "FOR VALUES WITH (modulus 2, remainder 0)"
            let num = |key: &str| -> i32 {
                bound
                    .split(key)
                    .nth(1)
                    .and_then(|x| x.trim().split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(-1)
            };
            let host = opt(&so, "host").unwrap_or_else(|| "localhost".into());
            let port = opt(&so, "port").unwrap_or_else(|| "5432".into());
            let db = opt(&so, "dbname").unwrap_or_else(|| "postgres".into());
            let user = opt(&uo, "user").unwrap_or_else(|| "postgres".into());
            Shard {
                partition: r.get(0),
                server: r.get(1),
                url: format!("postgres://{user}@{host}:{port}/{db}"),
                modulus: num("modulus"),
                remainder: num("remainder"),
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Sharding

/// Options of the foreign servers `init_sharded` creates.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// Rows per remote INSERT batch (postgres_fdw `batch_size`; the default 1 is a round trip a row).
    pub batch_size: u32,
    /// Rows per remote FETCH (postgres_fdw `fetch_size`).
    pub fetch_size: u32,
    /// Scan the shards concurrently where the plan has an Append (postgres_fdw `async_capable`).
    pub async_capable: bool,
    /// Build the HNSW index on each shard now (`None`: later, with `create_index`, after loading).
    pub hnsw: Option<(u32, u32)>,
    /// postgres_fdw `use_remote_estimate`: plan with the shards' own estimates. Without it a
    /// filtered search (`WHERE class = …`) was planned as "fetch every matching row (vectors as
    /// text) and sort on the coordinator": 1.4 s instead of 66 ms at 100k × 1280-d.
    pub use_remote_estimate: bool,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            batch_size: 1000,
            fetch_size: 1000,
            async_capable: true,
            hnsw: None,
            use_remote_estimate: true,
        }
    }
}

/// Create a sharded collection: on each shard the extension and a plain table (+ HNSW index if
/// asked); on the coordinator `postgres_fdw`, `vector`, one foreign server + user mapping per
/// shard (with `extensions 'vector'` so pgvector's operators are shipped), the meta row, and a
/// hash-partitioned table whose partitions are the shards' tables. Idempotent for the same
/// model and shard list; refused for another model.
pub fn init_sharded(
    coordinator: &str,
    shards: &[&str],
    meta: &StoreMeta,
    opts: &ShardOptions,
) -> Result<PgStore> {
    if shards.is_empty() {
        bail!("no shards given");
    }
    let cu = StoreUrl::parse(coordinator)?;
    let mut sus = Vec::new();
    for s in shards {
        let su = StoreUrl::parse(s)?;
        if su.table != cu.table && s.contains("table=") {
            bail!(
                "shard {s}: table {} differs from the coordinator's {}",
                su.table,
                cu.table
            );
        }
        sus.push(su);
    }
    let t = cu.table.clone();
    // Shards first: the coordinator's foreign tables point at tables that exist.
    for su in &sus {
        let mut c = su
            .connect()
            .with_context(|| "connecting to a shard".to_string())?;
        let mut tx = c.transaction().pg("begin")?;
        lock_name(&mut tx, &t)?;
        tx.batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
            .pg(&format!("{}: CREATE EXTENSION vector", su.url))?;
        tx.batch_execute(&table_ddl(&t, meta.dim))
            .pg(&format!("{}: creating {t}", su.url))?;
        // The shard's own column type must match (a table left by another model would differ).
        let typ: String = tx
            .query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attname = 'embedding'",
                &[&q(&t)],
            )
            .pg("reading the catalog")?
            .get(0);
        if typ != format!("vector({})", meta.dim) {
            bail!(
                "shard {}: table {t} has embedding {typ}, not vector({})",
                su.url,
                meta.dim
            );
        }
        tx.commit().pg("commit")?;
        if let Some((m, efc)) = opts.hnsw {
            build_index(&mut c, &t, m, efc)?;
        }
    }
    let mut c = cu.connect()?;
    {
        let mut tx = c.transaction().pg("begin")?;
        lock_name(&mut tx, &t)?;
        tx.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS vector; CREATE EXTENSION IF NOT EXISTS postgres_fdw",
        )
        .pg(&format!(
            "{}: CREATE EXTENSION vector, postgres_fdw",
            cu.url
        ))?;
        tx.batch_execute(&meta_ddl(&t))
            .pg("creating the meta table")?;
        let existing = tx
            .query_opt(
                &format!(
                    "SELECT model, size, dim, normalized FROM {}",
                    q(&format!("{t}_meta"))
                ),
                &[],
            )
            .pg("reading the meta row")?;
        if let Some(r) = existing {
            let have = StoreMeta {
                model: r.get(0),
                size: r.get::<_, i32>(1) as u32,
                dim: r.get::<_, i32>(2) as usize,
                normalized: r.get(3),
                info: serde_json::Value::Null,
            };
            if let Some(why) = have.mismatch(meta) {
                return Err(refuse(&cu, &have, &why));
            }
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)",
                    &[&q(&t)],
                )
                .pg("reading the catalog")?
                .get(0);
            if n as usize != sus.len() {
                bail!(
                    "{}: collection {t} exists with {n} shards, not {}",
                    cu.url,
                    sus.len()
                );
            }
            tx.commit().pg("commit")?;
        } else {
            let exists: bool = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&q(&t)])
                .pg("catalog")?
                .get(0);
            if exists {
                bail!(
                    "{}: table {t} exists but is no deeprank collection (no {t}_meta)",
                    cu.url
                );
            }
            tx.batch_execute(&format!(
                "CREATE TABLE {} (id bigint NOT NULL, path text NOT NULL, class text NOT NULL,
                  content_hash bytea NOT NULL, embedding vector({}) NOT NULL) PARTITION BY HASH (id)",
                q(&t),
                meta.dim
            ))
            .pg("creating the partitioned table")?;
            for (i, su) in sus.iter().enumerate() {
                let cfg = Config::from_str(&su.conn).map_err(|e| anyhow!("{}: {e}", su.url))?;
                let host = match cfg.get_hosts().first() {
                    Some(postgres::config::Host::Tcp(h)) => h.clone(),
                    #[cfg(unix)]
                    Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                let port = cfg.get_ports().first().copied().unwrap_or(5432);
                let db = cfg.get_dbname().unwrap_or("postgres").to_string();
                let user = cfg.get_user().unwrap_or("postgres").to_string();
                let srv = format!("{t}_s{i}");
                let mut o = format!(
                    "host {}, port {}, dbname {}, extensions 'vector', fetch_size {}, batch_size {}, async_capable {}, use_remote_estimate {}",
                    lit(&host),
                    lit(&port.to_string()),
                    lit(&db),
                    lit(&opts.fetch_size.to_string()),
                    lit(&opts.batch_size.to_string()),
                    lit(if opts.async_capable { "true" } else { "false" }),
                    lit(if opts.use_remote_estimate {
                        "true"
                    } else {
                        "false"
                    })
                );
                // Fail fast when a shard is unreachable rather than hanging a query.
                o.push_str(", connect_timeout '10'");
                let mut um = format!("user {}", lit(&user));
                if let Some(pw) = cfg.get_password() {
                    let _ = write!(um, ", password {}", lit(&String::from_utf8_lossy(pw)));
                }
                tx.batch_execute(&format!(
                    "DROP SERVER IF EXISTS {s} CASCADE;
                     CREATE SERVER {s} FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({o});
                     CREATE USER MAPPING FOR CURRENT_USER SERVER {s} OPTIONS ({um});
                     CREATE FOREIGN TABLE {p} PARTITION OF {tq}
                       FOR VALUES WITH (MODULUS {m}, REMAINDER {i}) SERVER {s} OPTIONS (table_name {tl})",
                    s = q(&srv),
                    p = q(&format!("{t}_p{i}")),
                    tq = q(&t),
                    m = sus.len(),
                    tl = lit(&t),
                ))
                .pg(&format!("attaching shard {i} ({})", su.url))?;
            }
            write_meta(&mut tx, &t, meta)?;
            tx.commit().pg("commit")?;
        }
    }
    PgStore::from_client(c, cu, Some(meta))
}
