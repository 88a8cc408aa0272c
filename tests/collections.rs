//! Any folder tree as a collection: unlabelled flat and nested folders, the label choices, the
//! reasons files are left out, and unlabelled DBs through embed, query, eval and train.

mod common;

use deeprank::data::collection::{Collection, Labels};
use deeprank::data::dataset::{Dataset, Layout, Split};
use std::path::{Path, PathBuf};

/// The `n`th sample val image (sorted by name).
fn jpeg(n: usize) -> PathBuf {
    let mut f: Vec<PathBuf> = std::fs::read_dir(common::sample().join("val/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    f.sort();
    f.swap_remove(n)
}

fn put(dst: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(jpeg(n), dst).unwrap();
    dst.to_path_buf()
}

fn reason(c: &Collection, name: &str) -> String {
    c.left_out
        .iter()
        .find(|s| s.path.file_name().unwrap() == name)
        .unwrap_or_else(|| panic!("{name} not among {:?}", c.left_out))
        .reason
        .clone()
}

/// `photos/a.jpg B.JPG trip/c.jpeg trip/deep/d.png` plus what must be left out: hidden files and
/// folders, a text file, a HEIC, a symlink loop and a dangling link.
fn photos(root: &Path) -> Vec<PathBuf> {
    let mut want = vec![
        put(&root.join("B.JPG"), 1),
        put(&root.join("a.jpg"), 2),
        put(&root.join("trip/c.jpeg"), 3),
        put(&root.join("trip/deep/d.png"), 4),
    ];
    want.sort();
    put(&root.join(".hidden.jpg"), 5);
    put(&root.join(".thumbs/e.jpg"), 6);
    std::fs::write(root.join("notes.txt"), "x").unwrap();
    std::fs::write(root.join("trip/IMG_1.HEIC"), "x").unwrap();
    std::os::unix::fs::symlink("..", root.join("trip/loop")).unwrap();
    std::os::unix::fs::symlink("nothing-here.jpg", root.join("gone.jpg")).unwrap();
    want
}

#[test]
fn a_flat_and_nested_folder_without_classes_is_every_image_unlabelled() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let want = photos(&root);
    let c = Collection::open(&root, Split::Train, &Labels::Auto).unwrap();
    assert_eq!(c.layout, Layout::Unlabelled);
    let got: Vec<PathBuf> = c.items.iter().map(|i| i.path.clone()).collect();
    assert_eq!(got, want, "all four, extensions in any case, sorted");
    assert!(c.items.iter().all(|i| i.class.is_none()));
    assert!(!c.is_labelled());
    assert!(reason(&c, "notes.txt").contains("not an image extension"));
    assert!(reason(&c, "IMG_1.HEIC").contains("unsupported image format .heic"));
    assert!(
        reason(&c, "loop").contains("already walked"),
        "the loop is cut"
    );
    assert!(reason(&c, "gone.jpg").contains("symbolic link to nothing"));
    assert_eq!(c.left_out.len(), 4, "hidden names are skipped silently");
    // Training and evaluation need labels and say how to give them.
    let e = Dataset::open(&root, Split::Train).unwrap_err().to_string();
    assert!(e.contains("no labels") && e.contains("--labels"), "{e}");
    assert!(e.contains("directly in it"), "names the reason: {e}");
    // --labels folders: trip is a class; the root's images are left out with the reason.
    let f = Collection::open(&root, Split::Train, &Labels::Folders).unwrap();
    assert_eq!(f.items.len(), 2);
    assert_eq!(f.classes[0].id, "trip");
    assert!(reason(&f, "a.jpg").contains("not in a class folder"));
    assert!(Collection::open(&root, Split::Train, &Labels::TinyImagenet).is_err());
}

#[test]
fn images_all_in_sub_folders_are_class_folders_at_any_depth() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    put(&root.join("cat/2019/a.jpg"), 1);
    put(&root.join("cat/b.jpg"), 2);
    put(&root.join("dog/deep/er/c.png"), 3);
    let ds = Dataset::open(&root, Split::Train).unwrap();
    assert_eq!(ds.layout, Layout::ClassFolders);
    let ids: Vec<&str> = ds.classes.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["cat", "dog"]);
    let classes: Vec<usize> = ds.items.iter().map(|i| i.class).collect();
    assert_eq!(classes, [0, 0, 1]);
    // --labels none: the same images, no classes.
    let n = Collection::open(&root, Split::Train, &Labels::None).unwrap();
    assert_eq!(n.items.len(), 3);
    assert!(!n.is_labelled());
}

#[test]
fn a_label_file_labels_the_rows_it_lists() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    photos(&root);
    let tsv = dir.path().join("labels.tsv");
    std::fs::write(
        &tsv,
        "path\tclass\n# comment\n./a.jpg\tbeach\ttrips to the sea\ntrip/c.jpeg\tcity\nB.JPG\tbeach\nmissing.jpg\tcity\n",
    )
    .unwrap();
    let c = Collection::open(&root, Split::Train, &Labels::File(tsv.clone())).unwrap();
    assert_eq!(c.layout, Layout::LabelFile);
    assert_eq!(c.items.len(), 4);
    let ids: Vec<&str> = c.classes.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["beach", "city"]);
    assert_eq!(c.classes[0].name, "trips to the sea");
    let by_name = |n: &str| c.items.iter().find(|i| i.path.ends_with(n)).unwrap().class;
    assert_eq!(by_name("a.jpg"), Some(0));
    assert_eq!(by_name("c.jpeg"), Some(1));
    assert_eq!(by_name("d.png"), None);
    assert!(reason(&c, "missing.jpg").contains("line 6"));
    // A Dataset keeps the labelled three and says why the fourth is out.
    let ds = Dataset::open_labelled(&root, Split::Train, &Labels::File(tsv.clone())).unwrap();
    assert_eq!(ds.items.len(), 3);
    assert!(ds.ignored.iter().any(|s| s.reason.contains("no label")));
    // A malformed row is an error naming the line.
    std::fs::write(&tsv, "a.jpg beach\n").unwrap();
    let e = Collection::open(&root, Split::Train, &Labels::File(tsv)).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn labels_none_on_a_tiny_imagenet_root_takes_every_image() {
    let c = Collection::open(&common::sample(), Split::Train, &Labels::None).unwrap();
    assert_eq!(c.items.len(), 360, "train and val");
    let auto = Collection::open(&common::sample(), Split::Train, &Labels::Auto).unwrap();
    assert_eq!(auto.layout, Layout::TinyImagenetTrain);
    assert_eq!(auto.items.len(), 300);
}

#[test]
fn an_unlabelled_db_embeds_queries_and_refuses_eval_and_train() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let want = photos(&root);
    let db = dir.path().join("db");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, out, err) = common::cli(&[
        "embed",
        "--data",
        &s(&root),
        "--out",
        &s(&db),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("embedded 4 images"), "{out}");
    assert!(err.contains("no labels"), "{err}");
    assert!(err.contains("not an image extension"), "{err}");
    assert!(err.contains("unsupported image format"), "{err}");
    assert!(!err.contains("without an image extension"), "{err}");
    let manifest = std::fs::read_to_string(db.join("manifest.tsv")).unwrap();
    assert!(
        manifest.lines().skip(1).all(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            f[2].is_empty() && f[3].is_empty() // id, path, class_id, class_name, ...
        }),
        "{manifest}"
    );
    // Query: results without same-class marks.
    let (code, out, err) = common::cli(&[
        "query",
        "--db",
        &s(&db),
        "--image",
        &s(&want[1]),
        "--top",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v[0]["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["path"].as_str().unwrap(), s(&want[1]));
    assert!(rows.iter().all(|r| r["same_class"].is_null()));
    // Ranking an unlabelled DB (as serve's "more like this" does with a DB row) marks nothing,
    // whatever the query's class.
    let opened = deeprank::store::db::Db::open(&db).unwrap();
    let row = opened.vectors.row(0).to_vec();
    for qc in [None, Some(String::new()), Some("beach".to_string())] {
        let ranked = deeprank::search::query::rank(&opened, &row, &[qc], 3);
        assert!(ranked[0].iter().all(|r| r.same_class.is_none()));
    }
    // Eval against it, and train on the folder, say they need labels.
    let (code, _, err) =
        common::cli(&["eval", "--db", &s(&db), "--queries", &s(&common::sample())]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no labels") && err.contains("eval needs"),
        "{err}"
    );
    let (code, _, err) = common::cli(&[
        "train",
        "--data",
        &s(&root),
        "--out",
        &s(&dir.path().join("run")),
        "--epochs",
        "1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no labels") && err.contains("class"), "{err}");
}
