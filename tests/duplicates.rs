//! Near-duplicates on a small planted set: sample images plus resized (×2), re-encoded (JPEG
//! quality 75) and cropped (95 %) copies of some of them; at the default threshold the planted
//! groups are found and nothing else. (bench/duplicates.sh measures the harder kinds.)

mod common;

use deeprank::benchkit::plant_duplicates;
use deeprank::data::collection::{Collection, Labels};
use deeprank::data::dataset::Split;
use deeprank::infer::embedder::Embedder;
use deeprank::search::duplicates::{self, DEFAULT_THRESHOLD};
use deeprank::store::build::embed_collection;
use deeprank::store::db::Db;
use std::collections::BTreeSet;
use std::path::PathBuf;

#[test]
fn planted_duplicates_are_found_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    // 40 distinct images (four per class, from every class) of which 10 get three copies.
    let mut originals: Vec<PathBuf> = Vec::new();
    for w in std::fs::read_to_string(common::sample().join("wnids.txt"))
        .unwrap()
        .lines()
    {
        let d = common::sample().join("train").join(w).join("images");
        let mut f: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        f.sort();
        originals.extend(f.into_iter().step_by(7).take(4));
    }
    assert_eq!(originals.len(), 40);
    let kinds = ["double", "jpeg75", "crop95"];
    let truth = plant_duplicates(&originals, 10, &kinds, &set, 1).unwrap();
    assert_eq!(truth.len(), 30);
    let c = Collection::open(&set, Split::Train, &Labels::None).unwrap();
    assert_eq!(c.items.len(), 70);
    let emb = Embedder::pretrained(Some(&common::weights()), 128, true).unwrap();
    let db_dir = dir.path().join("db");
    embed_collection(&emb, &c, &db_dir, None, 32).unwrap();
    let db = Db::open(&db_dir).unwrap();
    let found = duplicates::find(&db, DEFAULT_THRESHOLD).unwrap();
    let groups: BTreeSet<BTreeSet<PathBuf>> = found
        .groups
        .iter()
        .map(|g| g.members.iter().map(|m| m.path.clone()).collect())
        .collect();
    let mut want: BTreeSet<BTreeSet<PathBuf>> = BTreeSet::new();
    for chunk in truth.chunks(kinds.len()) {
        let mut g: BTreeSet<PathBuf> = chunk.iter().map(|t| t.copy.clone()).collect();
        g.insert(chunk[0].original.clone());
        want.insert(g);
    }
    assert_eq!(groups, want, "{found:#?}");
    assert!(found.groups.iter().all(|g| g.members[0].distance == 0.0));

    // Through the CLI: TSV by default, JSON, a picture per group.
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let grids = dir.path().join("grids");
    let (code, out, err) = common::cli(&["duplicates", "--db", &s(&db_dir), "--grid", &s(&grids)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().next(), Some("group\tid\tdistance\tpath"));
    assert_eq!(out.lines().count(), 1 + 40, "{out}");
    assert!(err.contains("10 groups (40 images"), "{err}");
    assert!(grids.join("group-10.png").is_file());
    let (code, out, _) = common::cli(&[
        "duplicates",
        "--db",
        &s(&db_dir),
        "--json",
        "--threshold",
        "0",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["groups"].as_array().unwrap().len(), 0, "no exact copies");
    let (code, _, err) = common::cli(&["duplicates", "--db", &s(&db_dir), "--threshold=-1"]);
    assert_ne!(code, 0);
    assert!(err.contains("threshold"), "{err}");
}
