//! A collection's schema: the table and its meta row, `create` (made if missing, refused for
//! another model) and `open`.

use super::shard::{list_shards, shard_err};
use super::{PgCtx, PgStore, Shard, StoreMeta, StoreUrl, WriteMode, pg_err, q, unreachable};
use anyhow::{Context, Result, anyhow};
use postgres::Client;

pub(super) fn meta_ddl(t: &str) -> String {
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

pub(super) fn table_ddl(t: &str, dim: usize) -> String {
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
            id bigint PRIMARY KEY, path text NOT NULL, class text NOT NULL, class_name text NOT NULL,
            content_hash bytea NOT NULL UNIQUE, embedding vector({dim}) NOT NULL);
         {plain}
         CREATE INDEX IF NOT EXISTS {ci} ON {tq} (class);
         CREATE INDEX IF NOT EXISTS {pi} ON {tq} (path text_pattern_ops);",
        tq = q(t),
        ci = q(&format!("{t}_class")),
        pi = q(&format!("{t}_path")),
    )
}

pub(super) fn read_meta(c: &mut Client, url: &StoreUrl) -> Result<Option<StoreMeta>> {
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

pub(super) fn write_meta(tx: &mut postgres::Transaction<'_>, t: &str, m: &StoreMeta) -> Result<()> {
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
pub(super) fn lock_name(tx: &mut postgres::Transaction<'_>, t: &str) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("deeprank:{t}")],
    )
    .pg("taking the collection lock")?;
    Ok(())
}

pub(super) fn refuse(url: &StoreUrl, have: &StoreMeta, why: &str) -> anyhow::Error {
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

    pub(super) fn from_client(
        mut c: Client,
        u: StoreUrl,
        expect: Option<&StoreMeta>,
    ) -> Result<PgStore> {
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
        let sharded = !shards.is_empty();
        Ok(PgStore {
            client: c,
            url: u,
            meta,
            shards,
            stage_ready: false,
            vector_type,
            // Sharded: binary COPY straight into each shard, 3-7x faster than through the
            // coordinator (postgres_fdw moves rows as text); one server: look up, then COPY.
            write_mode: if sharded {
                WriteMode::DirectToShards
            } else {
                WriteMode::CheckThenCopy
            },
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
    pub(super) fn qerr(&self, what: &str, e: postgres::Error) -> anyhow::Error {
        shard_err(&self.shards, &self.url, what, &e)
    }

    pub fn count(&mut self) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", q(&self.url.table));
        self.client
            .query_one(&sql, &[])
            .map(|r| r.get(0))
            .map_err(|e| self.qerr("count", e))
    }

    /// [`PgStore::count`]; with `allow_partial` on a sharded store, the rows of the shards that
    /// can be reached, and the shards that cannot (an error when none can).
    pub fn count_partial(&mut self, allow_partial: bool) -> Result<(i64, Vec<Shard>)> {
        if !allow_partial || !self.is_sharded() {
            return Ok((self.count()?, Vec::new()));
        }
        let (mut n, mut missing, mut down) = (0, Vec::new(), None);
        for s in self.shards.clone() {
            let sql = format!("SELECT count(*) FROM {}", q(&s.partition));
            match self.client.query_one(&sql, &[]) {
                Ok(r) => n += r.get::<_, i64>(0),
                Err(e) => {
                    let err = self.qerr("count", e);
                    if unreachable(&err).is_none() {
                        return Err(err);
                    }
                    missing.push(s);
                    down = Some(err);
                }
            }
        }
        match down {
            Some(err) if missing.len() == self.shards.len() => Err(err),
            _ => Ok((n, missing)),
        }
    }

    /// The distinct (class id, class name) of the labelled rows.
    pub fn classes(&mut self) -> Result<Vec<(String, String)>> {
        let sql = format!(
            "SELECT DISTINCT class, class_name FROM {} WHERE class <> '' ORDER BY 1, 2",
            q(&self.url.table)
        );
        let rows = self
            .client
            .query(&sql, &[])
            .map_err(|e| self.qerr("listing classes", e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// [`PgStore::classes`]; with `allow_partial` on a sharded store, of the shards that can be
    /// reached (each asked on its own; an error when none can).
    pub fn classes_partial(&mut self, allow_partial: bool) -> Result<Vec<(String, String)>> {
        if !allow_partial || !self.is_sharded() {
            return self.classes();
        }
        let mut out = std::collections::BTreeSet::new();
        let (mut down, mut reached) = (None, 0);
        for s in self.shards.clone() {
            let sql = format!(
                "SELECT DISTINCT class, class_name FROM {} WHERE class <> ''",
                q(&s.partition)
            );
            match self.client.query(&sql, &[]) {
                Ok(rows) => {
                    reached += 1;
                    out.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
                }
                Err(e) => {
                    let err = self.qerr("listing classes", e);
                    if unreachable(&err).is_none() {
                        return Err(err);
                    }
                    down = Some(err);
                }
            }
        }
        match down {
            Some(err) if reached == 0 => Err(err),
            _ => Ok(out.into_iter().collect()),
        }
    }

    /// Sets `key` of the meta row's `info` (e.g. the HNSW settings `index` chose).
    pub fn set_info(&mut self, key: &str, value: serde_json::Value) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET info = jsonb_set(info, ARRAY[$1::text], $2::text::jsonb)",
            q(&format!("{}_meta", self.url.table))
        );
        self.client
            .execute(&sql, &[&key, &value.to_string()])
            .pg("updating the meta row")?;
        if let Some(o) = self.meta.info.as_object_mut() {
            o.insert(key.to_string(), value);
        }
        Ok(())
    }
}
