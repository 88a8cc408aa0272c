//! A collection in PostgreSQL + pgvector: one table per collection, a metadata row beside it,
//! binary `COPY` writes that are idempotent by content hash, streaming reads, exact and HNSW search
//! with filters, and a sharded layout (a hash-partitioned table on a coordinator whose partitions
//! are postgres_fdw foreign tables on shard servers).
//!
//! Store URL: `postgres://user@host:port/dbname?table=photos` (any libpq URL; `table` is ours and
//! is removed before connecting, default `deeprank`; `sslmode` and `sslrootcert` are read by
//! [`tls`] and removed too).
//!
//! Layout of collection `t`:
//! - `t (id bigint primary key, path text, class text, class_name text, content_hash bytea unique,
//!   embedding vector(dim))`: `path` in the manifest's lossless escaped form, `class` the class id
//!   (empty when unlabelled), `content_hash` the SHA-256 of the file's bytes
//! - `t_meta`: one row (model identity, input size, dim, normalisation, and the full meta as JSON).
//! - sharded: on the coordinator `t` is `PARTITION BY HASH (id)` with foreign partitions `t_p<i>`
//!   on servers `t_s<i>`; each shard holds a plain `t` (same columns, constraints, HNSW index).
//!   Ids derived from the content hash ([`id_from_hash`]) put equal content on the same shard, so
//!   the per-shard unique constraint on `content_hash` is a global one.
//!
//! The client is the synchronous `postgres` crate (tokio-postgres driven by its own
//! current-thread runtime): call it from std threads or `spawn_blocking`, never directly from an
//! async task (it panics inside a tokio runtime).
//!
//! Files: this one (URL, metadata, rows, the store's fields), [`store`] (schema, create, open),
//! [`write`] (idempotent batches), [`read`] (streaming reads, search SQL, HNSW), [`shard`]
//! (postgres_fdw sharding), [`embed`] (images embedded into a store, a store read into a DB
//! folder, uploads) and [`sync`] (a store's rows under a folder made to match its files).

pub mod embed;
pub mod read;
pub mod shard;
pub mod store;
pub mod sync;
pub mod tls;
pub mod write;

pub use read::{Candidate, Filter, Iterative, Mode, Searched};
pub use shard::{Shard, ShardOptions, init_sharded};

use anyhow::{Context, Result, anyhow, bail};
use pgvector::Vector;
use postgres::types::Type;
use postgres::{Client, Config, NoTls};
use serde::{Deserialize, Serialize};
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
    /// `sslmode` / `sslrootcert` (libpq's semantics).
    pub tls: tls::Tls,
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
        let mut tls = tls::Tls::default();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("table", v)) => {
                    if table.replace(v.to_string()).is_some() {
                        bail!("{url}: table= given twice");
                    }
                }
                Some((k, v)) if tls.take_param(k, v, &redact(url))? => {}
                _ => rest.push(kv),
            }
        }
        tls.finish(&redact(url))?;
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
            tls,
        })
    }

    pub fn connect(&self) -> Result<Client> {
        let mut cfg =
            Config::from_str(&self.conn).map_err(|e| anyhow!("bad store URL {}: {e}", self.url))?;
        if cfg.get_connect_timeout().is_none() {
            // A server that does not answer fails the call rather than hanging it.
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        let made = match self.tls.mode {
            tls::SslMode::Disable => cfg.connect(NoTls),
            mode => {
                cfg.ssl_mode(if mode == tls::SslMode::Prefer {
                    postgres::config::SslMode::Prefer
                } else {
                    postgres::config::SslMode::Require
                });
                cfg.connect(self.tls.connector(&self.shown())?)
            }
        };
        made.map_err(|e| {
            if let Some(why) = tls::explain(&e, &self.tls) {
                // A TLS setting or certificate problem: waiting will not fix it.
                return anyhow!("cannot connect to {}: {why}", self.shown());
            }
            let msg = format!("cannot connect to {}: {}", self.shown(), pg_err(&e));
            if is_unreachable(&e) {
                anyhow::Error::new(Unreachable {
                    server: self.shown(),
                    shard: None,
                    message: msg,
                })
            } else {
                anyhow!(msg)
            }
        })
    }

    /// The URL without its password (for messages a client may see).
    pub fn shown(&self) -> String {
        redact(&self.url)
    }
}

/// How long a connection attempt waits when the URL sets no `connect_timeout`.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `postgres://user:secret@host/…` → `postgres://user:***@host/…`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A database server (or a shard behind the coordinator) that cannot be reached now: refused or
/// dropped connections, a server shutting down or starting up. A caller that can wait (the
/// server) answers "unavailable" and tries again later; anything else is a real error.
#[derive(Debug)]
pub struct Unreachable {
    /// The server's URL (password removed).
    pub server: String,
    /// The foreign partition, when a shard behind the coordinator is the one unreachable.
    pub shard: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unreachable {}

/// The [`Unreachable`] cause of an error, if that is what it is.
pub fn unreachable(e: &anyhow::Error) -> Option<&Unreachable> {
    e.chain().find_map(|c| c.downcast_ref::<Unreachable>())
}

/// Whether a driver error means the server (or a shard the coordinator asked) is unreachable:
/// a closed connection, an I/O error or timeout, SQLSTATE class 08 (connection exception, as
/// postgres_fdw reports a shard it cannot reach), or 57P01-57P03 (shutting down, crashed,
/// starting up).
pub fn is_unreachable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(c) = e.code() {
        let c = c.code();
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03");
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        src = s.source();
    }
    e.to_string().contains("timed out")
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
    /// Class id (empty when unlabelled).
    pub class: &'a str,
    pub class_name: &'a str,
    pub content_hash: &'a [u8],
    pub embedding: &'a [f32],
}

/// A row read back.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRow {
    pub id: i64,
    pub path: String,
    pub class: String,
    pub class_name: String,
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

/// A queued row: id, path, class, class name, content hash, vector.
type Row = (i64, String, String, String, Vec<u8>, Vector);

/// `LIKE` pattern of a path prefix (`%`, `_` and `\` match literally).
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

/// An open collection: one connection to its server (the coordinator when sharded).
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
    pending: Vec<Row>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let u =
            StoreUrl::parse("postgres://me@h:5433/media?table=photos&connect_timeout=5").unwrap();
        assert_eq!(u.table, "photos");
        assert_eq!(u.conn, "postgres://me@h:5433/media?connect_timeout=5");
        assert_eq!(
            StoreUrl::parse("postgresql://h/db").unwrap().table,
            DEFAULT_TABLE
        );
        for bad in [
            "postgres://h/db?table=Photos",
            "postgres://h/db?table=1x",
            "postgres://h/db?table=a;drop",
            "postgres://h/db?table=a&table=b",
            "mysql://h/db",
            "photos-db",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(is_store_url("postgres://x") && !is_store_url("./postgres"));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://me:s3cr@t@h:5/db?table=x"),
            "postgres://me:***@h:5/db?table=x"
        );
        for same in [
            "postgres://me@h/db",
            "postgres://h/db?x=a@b",
            "postgres://h:5/db",
        ] {
            assert_eq!(redact(same), same);
        }
    }

    #[test]
    fn ids_and_patterns() {
        assert_eq!(id_from_hash(&[0xff; 32]), i64::MAX);
        assert_eq!(id_from_hash(&[0, 0, 0, 0, 0, 0, 1, 2]), 258);
        assert_eq!(like_prefix("a_b%c\\d/"), "a\\_b\\%c\\\\d/%");
    }
}
