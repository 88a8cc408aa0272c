//! Helpers for the tests of a changing DB: small DBs, copies, and a DB's logical content.

use deeprank::store::check::check;
use deeprank::store::db::{Db, DbWriter, Entry, Meta};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A DB of 3 classes × 4 sample images at 64 px (at 32 px the pretrained features are all zero), made once per test binary (copy it to change it).
pub fn template() -> &'static (PathBuf, PathBuf) {
    static T: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        super::weights();
        let dir = std::env::temp_dir().join(format!("deeprank-coll-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        super::class_folders(&data, 3, 4);
        let db = dir.join("db");
        let (code, _, err) = super::cli(&[
            "embed",
            "--data",
            data.to_str().unwrap(),
            "--out",
            db.to_str().unwrap(),
            "--size",
            "64",
        ]);
        assert_eq!(code, 0, "{err}");
        (data, db)
    })
}

/// A fresh copy of the template's data and DB in `dir` (`dir/data`, `dir/db`).
pub fn fresh(dir: &Path) -> (PathBuf, PathBuf) {
    let (data, db) = template();
    let (d, b) = (dir.join("data"), dir.join("db"));
    copy_dir(data, &d);
    copy_dir(db, &b);
    relocate(&b, data, &d);
    (d, b)
}

/// A DB's content as users see it: per live id, its path, class and vector (bit patterns).
pub type Logical = Vec<(u64, String, String, Vec<u32>)>;

pub fn logical(dir: &Path) -> Logical {
    let db = Db::open(dir).unwrap();
    db.live_rows()
        .map(|r| {
            (
                db.ids[r],
                db.entries[r].path.to_string_lossy().to_string(),
                db.entries[r].class_id.clone(),
                db.vectors.row(r).iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// Asserts the DB opens and `check` finds no damage; returns the notes (what a crash left).
pub fn consistent(dir: &Path) -> Vec<String> {
    let rep = check(dir).unwrap_or_else(|e| panic!("{} cannot be opened: {e:#}", dir.display()));
    assert!(
        rep.problems.is_empty(),
        "{}: {:?}",
        dir.display(),
        rep.problems
    );
    rep.notes
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// A DB of `n` synthetic rows (no model needed): paths `root/img-i.jpg`, dim 8.
pub fn synthetic(dir: &Path, n: usize) -> PathBuf {
    let db = dir.join("db");
    let mut w = DbWriter::create(&db, 8, None).unwrap();
    for i in 0..n {
        let v: Vec<f32> = (0..8).map(|j| ((i * 8 + j) as f32).sin()).collect();
        w.push(
            &Entry {
                path: dir.join(format!("img-{i}.jpg")),
                class_id: format!("c{}", i % 3),
                class_name: format!("class {}", i % 3),
            },
            &v,
        )
        .unwrap();
    }
    w.finish(Meta {
        model: "synthetic".into(),
        model_source: "synthetic".into(),
        size: 32,
        dim: 8,
        count: n,
        normalized: false,
        data: dir.display().to_string(),
        deeprank_version: "test".into(),
        format: 2,
    })
    .unwrap();
    db
}

/// Rewrites a DB the way deeprank wrote them before format 2: three manifest columns, no
/// `state.json`, no `removed.tsv`, no `format` in meta.json.
pub fn make_format_1(db: &Path) {
    let d = Db::open(db).unwrap();
    let mut text = String::from("path\tclass_id\tclass_name\n");
    for e in &d.entries {
        text.push_str(&format!(
            "{}\t{}\t{}\n",
            e.path.display(),
            e.class_id,
            e.class_name
        ));
    }
    drop(d);
    std::fs::write(db.join("manifest.tsv"), text).unwrap();
    for f in ["state.json", "removed.tsv", ".lock"] {
        let _ = std::fs::remove_file(db.join(f));
    }
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.join("meta.json")).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("format");
    std::fs::write(db.join("meta.json"), meta.to_string()).unwrap();
}

/// A distinct decodable PNG (a gradient keyed by `seed`).
pub fn png(path: &Path, seed: u32) {
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([
            (x * 5 + seed * 37) as u8,
            (y * 6 + seed * 11) as u8,
            ((x + y) * 3 + seed * 71) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// Points a copied DB's manifest at a copied data folder (`from` → `to` in every path) and
/// updates the commit record's manifest length. For freshly written DBs (no uncommitted tail).
pub fn relocate(db: &Path, from: &Path, to: &Path) {
    let (from, to) = (from.to_str().unwrap(), to.to_str().unwrap());
    let text = std::fs::read_to_string(db.join("manifest.tsv")).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let mut f: Vec<String> = line.split('\t').map(str::to_string).collect();
        if i > 0 && f[1].starts_with(from) {
            f[1] = format!("{to}{}", &f[1][from.len()..]);
        }
        out.push_str(&f.join("\t"));
        out.push('\n');
    }
    std::fs::write(db.join("manifest.tsv"), &out).unwrap();
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.join("state.json")).unwrap()).unwrap();
    st["manifest_bytes"] = serde_json::json!(out.len());
    std::fs::write(db.join("state.json"), st.to_string()).unwrap();
}
