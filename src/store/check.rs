//! `deeprank check`: reads a DB the way every reader does and looks further: the committed rows
//! against the files, finite vectors, one live row per path, and what a crash left for the next
//! writer to repair (reported as notes: readers never see it).

use crate::store::changes::normalize;
use crate::store::db::{Db, MANIFEST, REMOVED, VECTORS};
use crate::store::npy::{NPY_HEADER, npy_header};
use crate::store::state;
use anyhow::Result;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub format: u32,
    pub generation: u64,
    pub rows: usize,
    pub live: usize,
    /// Left by a crash, harmless to readers, repaired by the next add/remove/sync/compact.
    pub notes: Vec<String>,
    /// Real damage.
    pub problems: Vec<String>,
}

/// Checks a DB; an error when it cannot even be opened.
pub fn check(dir: &Path) -> Result<CheckReport> {
    let db = Db::open(dir)?;
    let mut rep = CheckReport {
        format: db.state.format,
        generation: db.state.generation,
        rows: db.rows(),
        live: db.len(),
        ..Default::default()
    };
    let dim = db.meta.dim;
    if db.vectors.data().iter().any(|v| !v.is_finite()) {
        rep.problems.push("some vectors are not finite".into());
    }
    let mut paths: HashMap<_, u64> = HashMap::new();
    for r in db.live_rows() {
        if let Some(other) = paths.insert(normalize(&db.entries[r].path), db.ids[r]) {
            rep.problems.push(format!(
                "ids {other} and {} are both live for {}",
                db.ids[r],
                db.entries[r].path.display()
            ));
        }
    }
    if db.state.format == 2 {
        let st = &db.state;
        let len = |name: &str| {
            std::fs::metadata(dir.join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let tails = [
            (VECTORS, NPY_HEADER as u64 + st.rows * dim as u64 * 4),
            (MANIFEST, st.manifest_bytes),
            (REMOVED, st.removed_bytes),
        ];
        for (name, committed) in tails {
            if st.pending.is_empty() && len(name) > committed {
                rep.notes.push(format!(
                    "{name} has {} uncommitted bytes past the commit",
                    len(name) - committed
                ));
            }
        }
        if !st.pending.is_empty() {
            rep.notes.push(format!(
                "{} renames of the last commit are pending",
                st.pending.len()
            ));
        }
        let mut head = vec![0u8; NPY_HEADER];
        if let Ok(mut f) = std::fs::File::open(dir.join(VECTORS)) {
            let _ = std::io::Read::read_exact(&mut f, &mut head);
        }
        if st.pending.is_empty() && head != npy_header(st.rows as usize, dim) {
            rep.notes.push(format!(
                "the header of {VECTORS} does not yet say {} rows (numpy's view)",
                st.rows
            ));
        }
        if let Some(ix) = &st.index {
            if ix.rows > st.rows {
                rep.problems.push(format!(
                    "the ANN index {} claims {} rows, the DB has {}",
                    ix.file, ix.rows, st.rows
                ));
            }
            if let Some(e) = db.index.as_ref().and_then(|m| m.error()) {
                rep.problems.push(e.to_string());
            }
        }
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let named = st
                .index
                .as_ref()
                .is_some_and(|i| i.files().contains(&&*name));
            if crate::store::commit::is_index_file(&name) && !named {
                rep.notes.push(format!(
                    "{name} is an ANN index file no commit names (left by an interrupted index update)"
                ));
            }
        }
        for stray in [state::STATE_TMP, "vectors.npy.new", "manifest.tsv.new"] {
            if dir.join(stray).exists() && st.pending.iter().all(|(a, _)| a != stray) {
                rep.notes
                    .push(format!("{stray} is left from an interrupted change"));
            }
        }
    } else {
        rep.notes
            .push("format 1: upgraded to format 2 by the first add/remove/sync/compact".into());
    }
    Ok(rep)
}
