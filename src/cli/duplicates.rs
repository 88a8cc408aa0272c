//! `deeprank duplicates`: near-identical images of a DB as TSV (default) or JSON, and a picture per
//! group on request.

use anyhow::{Context, Result};
use deeprank::render::grid;
use deeprank::search::duplicates::{self, DEFAULT_THRESHOLD};
use deeprank::store::db::Db;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DuplicatesArgs {
    #[arg(long)]
    db: PathBuf,
    /// Largest Euclidean distance between two near-duplicates (default: 0.5, measured on
    /// L2-normalised pretrained features at 128 px; see bench/RESULTS.md).
    #[arg(long)]
    threshold: Option<f32>,
    /// Prints JSON instead of TSV.
    #[arg(long, conflicts_with = "tsv")]
    json: bool,
    /// Prints TSV (the default): group, id, distance to the group's first image, path.
    #[arg(long)]
    tsv: bool,
    /// Draws each group to DIR/group-N.png (the first image, then the others).
    #[arg(long, value_name = "DIR")]
    grid: Option<PathBuf>,
}

pub fn run(a: DuplicatesArgs) -> Result<()> {
    let snapshot = super::pg::url(&a.db).map(super::pg::snapshot).transpose()?;
    let opened;
    let db = match &snapshot {
        Some(s) => &s.db,
        None => {
            opened = Db::open(&a.db)?;
            &opened
        }
    };
    let threshold = match a.threshold {
        Some(t) => t,
        None => {
            if !db.meta.normalized || db.meta.model_source != "pretrained" {
                eprintln!(
                    "note: the default threshold {DEFAULT_THRESHOLD} was measured on L2-normalised pretrained \
                     features; this DB's are {} from {}: check the groups (--grid) or pass --threshold",
                    if db.meta.normalized {
                        "normalised"
                    } else {
                        "raw"
                    },
                    db.meta.model_source
                );
            }
            DEFAULT_THRESHOLD
        }
    };
    let t0 = std::time::Instant::now();
    let mut found = duplicates::find(db, threshold)?;
    if let Some(s) = &snapshot {
        for m in found.groups.iter_mut().flat_map(|g| g.members.iter_mut()) {
            m.id = s.store_id(m.id);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        println!("group\tid\tdistance\tpath");
        for g in &found.groups {
            for m in &g.members {
                println!(
                    "{}\t{}\t{:.4}\t{}",
                    g.group,
                    m.id,
                    m.distance,
                    m.path.display()
                );
            }
        }
    }
    eprintln!(
        "{} groups ({} images, {} pairs within distance {}) among {} images in {:.2}s",
        found.groups.len(),
        found.grouped,
        found.pairs,
        threshold,
        found.images,
        t0.elapsed().as_secs_f64()
    );
    if let Some(dir) = a.grid {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        for g in &found.groups {
            let out = dir.join(format!("group-{}.png", g.group));
            grid::write(&g.grid(), &out)?;
        }
        if !found.groups.is_empty() {
            eprintln!(
                "grids: {}/group-1.png … group-{}.png",
                dir.display(),
                found.groups.len()
            );
        }
    }
    Ok(())
}
