//! Writes: rows queued and written a batch per transaction, idempotent by content hash (binary
//! `COPY`; on a sharded collection straight into each shard), and deletes.

use super::shard::shard_err;
use super::{
    PgCtx, PgStore, Row, RowRef, StoreUrl, Unreachable, WriteMode, is_unreachable, like_prefix,
    pg_err, q, redact,
};
use anyhow::{Context, Result, bail};
use pgvector::Vector;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use std::collections::HashSet;

impl PgStore {
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
            row.class_name.to_string(),
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

    pub(super) fn types(&self) -> [Type; 6] {
        [
            Type::INT8,
            Type::TEXT,
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
        rows: &[&Row],
    ) -> std::result::Result<u64, postgres::Error> {
        let sink = tx.copy_in(&format!(
            "COPY {target} (id, path, class, class_name, content_hash, embedding) FROM STDIN (FORMAT binary)"
        ))?;
        let mut w = BinaryCopyInWriter::new(sink, types);
        for (id, p, c, cn, h, v) in rows {
            w.write(&[id, p, c, cn, h, v])?;
        }
        w.finish()
    }

    fn write_staged(&mut self, rows: &[Row]) -> Result<u64> {
        let t = q(&self.url.table);
        if !self.stage_ready {
            self.client
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS deeprank_stage
                     (id bigint, path text, class text, class_name text, content_hash bytea, embedding vector) ON COMMIT DELETE ROWS",
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
                    "INSERT INTO {t} (id, path, class, class_name, content_hash, embedding)
                     SELECT DISTINCT ON (content_hash) id, path, class, class_name, content_hash, embedding
                     FROM deeprank_stage ON CONFLICT DO NOTHING"
                ),
                &[],
            )?;
            tx.commit()?;
            Ok(n)
        })();
        res.map_err(|e| self.qerr("writing a batch", e))
    }

    fn write_checked(&mut self, rows: &[Row]) -> Result<u64> {
        let hashes: Vec<&[u8]> = rows.iter().map(|r| r.4.as_slice()).collect();
        let have = self.stored_hashes(&hashes)?;
        let mut seen = HashSet::new();
        let new: Vec<_> = rows
            .iter()
            .filter(|r| !have.contains(&r.4) && seen.insert(r.4.as_slice()))
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

    fn write_direct(&mut self, rows: &[Row]) -> Result<u64> {
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
            let mine: Vec<&Row> = rows
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
            let types = [
                Type::INT8,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::BYTEA,
                ty.clone(),
            ];
            let t = q(&self.url.table);
            let res = (|| -> std::result::Result<u64, postgres::Error> {
                let hashes: Vec<&[u8]> = mine.iter().map(|r| r.4.as_slice()).collect();
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
                    .filter(|r| !have.contains(&r.4) && seen.insert(r.4.as_slice()))
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
                    } else if is_unreachable(&e) {
                        return Err(anyhow::Error::new(Unreachable {
                            server: redact(&shard.url),
                            shard: Some(shard.partition.clone()),
                            message: format!("{what}: {}", pg_err(&e)),
                        }));
                    } else {
                        bail!("{what}: {}", pg_err(&e));
                    }
                }
            }
        }
        Ok(total)
    }

    /// Deletes the rows each target names (an id, or any of some exact paths, or a path under
    /// any of some prefixes: a folder, given with a trailing `/`), in one transaction: when a
    /// target names no row, nothing is removed and the error names it. Returns the (id, path) of
    /// the rows that went.
    pub fn remove(&mut self, targets: &[RemoveTarget]) -> Result<Vec<(i64, String)>> {
        let sql = format!(
            "DELETE FROM {} WHERE id = ANY($1) OR path = ANY($2) OR path LIKE ANY($3) RETURNING id, path",
            q(&self.url.table)
        );
        let mut tx = self
            .client
            .transaction()
            .map_err(|e| shard_err(&self.shards, &self.url, "removing", &e))?;
        let mut out = Vec::new();
        for t in targets {
            let likes: Vec<String> = t.prefixes.iter().map(|p| like_prefix(p)).collect();
            let rows = tx
                .query(&sql, &[&t.ids, &t.paths, &likes])
                .map_err(|e| shard_err(&self.shards, &self.url, "removing", &e))?;
            if rows.is_empty() {
                bail!(
                    "{} is neither an id nor the path of a file or folder in {}: nothing was removed",
                    t.given,
                    self.url.url
                );
            }
            out.extend(
                rows.iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))),
            );
        }
        tx.commit()
            .map_err(|e| shard_err(&self.shards, &self.url, "removing", &e))?;
        out.sort();
        out.dedup();
        Ok(out)
    }
}

impl PgStore {
    /// Deletes the rows with these ids (those that exist), in one transaction. Returns how many.
    pub fn remove_ids(&mut self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = format!("DELETE FROM {} WHERE id = ANY($1)", q(&self.url.table));
        self.client
            .execute(&sql, &[&ids])
            .map_err(|e| self.qerr("removing", e))
    }
}

/// What one `remove` argument names.
#[derive(Clone, Debug, Default)]
pub struct RemoveTarget {
    /// The argument as given (for the error).
    pub given: String,
    pub ids: Vec<i64>,
    pub paths: Vec<String>,
    pub prefixes: Vec<String>,
}
