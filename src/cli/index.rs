//! `deeprank index` and the search flags of query/eval/serve (`--ef`, `--recall`, `--exact`,
//! `--where`): parsing them into the library's `search::ann` types and printing what it did.

use anyhow::{Result, bail};
use deeprank::search::ann::Params;
use deeprank::search::ann::db::{self as ann_db, DbIndex, Mode, Plan, Where};
use deeprank::search::ann::update::{self, Built};
use deeprank::store::db::Db;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct IndexArgs {
    #[arg(long)]
    db: PathBuf,
    /// Neighbours per node (2M on the bottom layer): more is better recall per ef, a bigger file.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// Candidates per insert while building: more is a better graph, a slower build.
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// A PostgreSQL store only: the hnsw.ef_search its queries use (set on every shard when
    /// sharded) [default: 40]. A DB folder's queries take --ef themselves.
    #[arg(long)]
    ef: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// How query, eval and serve search: through the DB's ANN index (when it has one) or exactly.
#[derive(clap::Args, Clone)]
pub struct SearchFlags {
    /// Candidates the index search keeps (more: better recall, slower) [default: 64].
    #[arg(long, conflicts_with_all = ["recall", "exact"])]
    pub(super) ef: Option<usize>,
    /// Recall@10 to reach: the smallest ef whose recall `deeprank index` measured reaches it (the
    /// exact scan when none does).
    #[arg(long, conflicts_with = "exact")]
    pub(super) recall: Option<f64>,
    /// Scans every row exactly, index or not.
    #[arg(long)]
    pub(super) exact: bool,
}

impl SearchFlags {
    pub fn mode(&self) -> Result<Mode> {
        Ok(match (self.exact, self.ef, self.recall) {
            (true, _, _) => Mode::Exact,
            (_, Some(0), _) => bail!("--ef must be at least 1"),
            (_, Some(ef), _) => Mode::Ef(ef),
            (_, _, Some(r)) if !(r > 0.0 && r <= 1.0) => {
                bail!("--recall {r}: give a target recall@10 above 0 and at most 1, e.g. 0.95")
            }
            (_, _, Some(r)) => Mode::Recall(r),
            _ => Mode::default(),
        })
    }

    /// The mode and the DB's index when the mode uses it (`--exact` never opens it, so a damaged
    /// index file does not stop an exact search).
    pub fn open(&self, db: &Db) -> Result<(Mode, Option<DbIndex>)> {
        let mode = self.mode()?;
        let index = match mode {
            Mode::Exact => None,
            _ => ann_db::open(db)?,
        };
        Ok((mode, index))
    }
}

/// `--where` conditions parsed.
pub fn wheres(conds: &[String]) -> Result<Vec<Where>> {
    conds.iter().map(|c| Where::parse(c)).collect()
}

/// Says on stderr how a search ran, when it used the index.
pub fn say_plan(plan: Plan) {
    if let Plan::Index { ef, tail } = plan {
        if tail > 0 {
            eprintln!(
                "searched with the ANN index (ef {ef}) and exactly over the {tail} rows added since it was built"
            );
        } else {
            eprintln!("searched with the ANN index (ef {ef})");
        }
    }
}

fn say_built(b: &Built) {
    let how = match (b.rebuilt, b.delta) {
        (true, _) => "built",
        (false, true) => "updated (a delta over its graph file)",
        (false, false) => "updated (graph file rewritten)",
    };
    eprintln!(
        "ANN index {how}: {} rows ({} inserted) in {:.2}s, {} ({:.1} MB), M {} efConstruction {}",
        b.rows,
        b.inserted,
        b.seconds,
        b.file.display(),
        b.bytes as f64 / 1048576.0,
        b.m,
        b.ef_construction
    );
}

/// `deeprank index`.
pub fn index(a: IndexArgs) -> Result<()> {
    if let Some(url) = super::pg::url(&a.db) {
        return super::pg::index(url, a.m, a.ef_construction, a.ef);
    }
    if a.ef.is_some() {
        bail!(
            "--ef is a query's flag for a DB folder (deeprank query --ef N); index takes it for a PostgreSQL store"
        );
    }
    let b = update::build(
        &a.db,
        &Params {
            m: a.m,
            ef_construction: a.ef_construction,
            ..Params::default()
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    say_built(&b);
    let cal: Vec<String> = b
        .calibration
        .iter()
        .map(|(ef, r)| format!("ef {ef}: {r:.3}"))
        .collect();
    println!(
        "indexed {} rows of {}: {} ({} bytes); recall@10 measured on DB rows: {}",
        b.rows,
        a.db.display(),
        b.file.display(),
        b.bytes,
        cal.join(", ")
    );
    Ok(())
}

/// The index parameters before a change (to rebuild it after a compaction).
pub fn before_change(db: &Path) -> Option<Params> {
    update::params_of(db)
}

/// After a committed change: folds the new rows into the index (or rebuilds it after a
/// compaction). A failure is a warning: the change itself is committed, and rows past the index are
/// searched exactly.
pub fn after_change(db: &Path, had: Option<Params>) {
    match update::refresh(db, had) {
        Ok(Some(b)) => say_built(&b),
        Ok(None) => {}
        Err(e) => eprintln!(
            "warning: the change is committed, but the ANN index was not updated: {e:#}. Rows past the index are searched exactly; rebuild it with `deeprank index --db {}`",
            db.display()
        ),
    }
}
