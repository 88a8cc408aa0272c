//! Dataset layouts and the triplet sampler.

mod common;

use deeprank::data::dataset::{Dataset, Layout, Split};
use deeprank::data::sampler;
use std::collections::HashSet;
use std::path::Path;

#[test]
fn tiny_imagenet_root_and_val() {
    let tr = Dataset::open(&common::sample(), Split::Train).unwrap();
    assert_eq!(tr.layout, Layout::TinyImagenetTrain);
    assert_eq!(tr.classes.len(), 10);
    assert_eq!(tr.items.len(), 300);
    assert_eq!(tr.classes[0].id, "n01443537");
    assert_eq!(tr.classes[0].name, "goldfish");
    assert!(tr.ignored.is_empty());
    let va = Dataset::open(&common::sample(), Split::Val).unwrap();
    assert_eq!(va.layout, Layout::TinyImagenetVal);
    assert_eq!(va.items.len(), 60);
    assert!(
        va.items
            .iter()
            .all(|i| va.classes[i.class].id.starts_with('n'))
    );
    // The val folder itself works too, with names from the parent's words.txt.
    let va2 = Dataset::open(&common::sample().join("val"), Split::Val).unwrap();
    assert_eq!(va2.items, va.items);
    assert_eq!(va2.classes[0].name, va.classes[0].name);
    // train/ alone is a class-folder tree with images/ subfolders.
    let tr2 = Dataset::open(&common::sample().join("train"), Split::Train).unwrap();
    assert_eq!(tr2.layout, Layout::ClassFolders);
    assert_eq!(tr2.items.len(), 300);
}

#[test]
fn class_folders_and_split_roots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("flowers");
    common::class_folders(&root.join("train"), 3, 4);
    common::class_folders(&root.join("val"), 3, 2);
    std::fs::write(root.join("train").join("n01443537").join("notes.txt"), "x").unwrap();
    let tr = Dataset::open(&root, Split::Train).unwrap();
    assert_eq!(tr.layout, Layout::ClassFolders);
    assert_eq!(tr.items.len(), 12);
    assert_eq!(tr.ignored.len(), 1);
    let va = Dataset::open(&root, Split::Val).unwrap();
    assert_eq!(va.items.len(), 6);
    // Deterministic order.
    let again = Dataset::open(&root, Split::Train).unwrap();
    assert_eq!(tr.items, again.items);
}

#[test]
fn missing_and_empty_folders_are_clear_errors() {
    let e = Dataset::open(std::path::Path::new("/no/such/folder"), Split::Train).unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    let dir = tempfile::tempdir().unwrap();
    let e = Dataset::open(dir.path(), Split::Train).unwrap_err();
    assert!(format!("{e:#}").contains("no images"), "{e:#}");
}

#[test]
fn sampler_follows_the_seed_rules() {
    let ds = Dataset::open(&common::sample(), Split::Train).unwrap();
    let s = sampler::sample(&ds, 2, 3, 7).unwrap();
    assert_eq!(s.triplets.len(), 300 * 2 * 3);
    for t in &s.triplets {
        let (q, p, n) = (
            &ds.items[t.query],
            &ds.items[t.positive],
            &ds.items[t.negative],
        );
        assert_ne!(t.query, t.positive, "a positive is never the query itself");
        assert_eq!(q.class, p.class);
        assert_ne!(q.class, n.class);
    }
    // Per query: n_pos distinct positives, each with n_neg negatives.
    for chunk in s.triplets.chunks(6) {
        assert!(chunk.iter().all(|t| t.query == chunk[0].query));
        let pos: HashSet<usize> = chunk.iter().map(|t| t.positive).collect();
        assert_eq!(pos.len(), 2);
    }
    // Same seed, same triplets; another seed, others.
    assert_eq!(sampler::sample(&ds, 2, 3, 7).unwrap().triplets, s.triplets);
    assert_ne!(sampler::sample(&ds, 2, 3, 8).unwrap().triplets, s.triplets);
}

#[test]
fn triplet_file_round_trip_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("triplets.txt");
    let data = common::sample();
    let args = [
        "sample",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--n-pos",
        "1",
        "--n-neg",
        "2",
        "--seed",
        "3",
    ];
    let (code, stdout, stderr) = common::cli(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote 600 triplets"), "{stdout}");
    let first = std::fs::read_to_string(&out).unwrap();
    let line = first.lines().next().unwrap();
    assert_eq!(line.split(',').count(), 3);
    assert!(
        line.starts_with(data.join("train/n01443537/images/").to_str().unwrap()),
        "{line}"
    );
    let (code, _, stderr) = common::cli(&args);
    assert_eq!(code, 0, "second run: {stderr}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        first,
        "same seed, same file"
    );
    let ds = Dataset::open(&data, Split::Train).unwrap();
    let back = sampler::read_triplets(&ds, &out).unwrap();
    assert_eq!(back, sampler::sample(&ds, 1, 2, 3).unwrap().triplets);
}

#[test]
fn small_classes_are_left_out_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    common::class_folders(dir.path(), 3, 5);
    // A class with a single image.
    let lonely = dir.path().join("zz_lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    std::fs::copy(
        common::sample().join("val/images/val_68.JPEG"),
        lonely.join("a.jpg"),
    )
    .unwrap();
    let ds = Dataset::open(dir.path(), Split::Train).unwrap();
    let s = sampler::sample(&ds, 1, 1, 0).unwrap();
    assert_eq!(s.small_classes.len(), 1);
    assert_eq!(ds.classes[s.small_classes[0]].id, "zz_lonely");
    assert_eq!(s.triplets.len(), 15);
    assert!(
        s.triplets
            .iter()
            .all(|t| ds.items[t.query].class != s.small_classes[0]
                && ds.items[t.negative].class != s.small_classes[0])
    );
    let out = dir.path().join("t.txt");
    let (code, _, stderr) = common::cli(&[
        "sample",
        "--data",
        dir.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        stderr.contains("zz_lonely has fewer than two images"),
        "{stderr}"
    );
}

#[test]
fn sampling_one_class_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::class_folders(dir.path(), 1, 5);
    let ds = Dataset::open(dir.path(), Split::Train).unwrap();
    assert!(sampler::sample(&ds, 1, 1, 0).is_err());
    assert!(sampler::sample(&ds, 0, 1, 0).is_err());
}

/// `bench/split_mini.sh` (the model-selection and unseen-classes splits of bench/RESULTS.md §3)
/// on the sample: per class the first FIT train images in `fit/`, the rest in `sel/`, disjoint;
/// the first SEEN classes' images in `seen/`, the others' train images in `unseen-db/` and their
/// val images in `unseen-q/`; each opens as a dataset. A root without `wnids.txt` is refused,
/// naming the file.
#[test]
fn split_mini_script_builds_disjoint_selection_and_unseen_splits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("split");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/split_mini.sh");
    let run = |root: &Path| {
        std::process::Command::new("bash")
            .arg(&script)
            .arg(root)
            .arg(&out)
            .env("FIT", "24")
            .env("SEEN", "8")
            .output()
            .unwrap()
    };
    let o = run(&common::sample());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let open = |d: &str, split| Dataset::open(&out.join(d), split).unwrap();
    let (fit, sel) = (open("fit", Split::Train), open("sel", Split::Val));
    assert_eq!((fit.classes.len(), fit.items.len()), (10, 240));
    assert_eq!((sel.classes.len(), sel.items.len()), (10, 60));
    let real = |ds: &Dataset| -> HashSet<std::path::PathBuf> {
        ds.items
            .iter()
            .map(|i| i.path.canonicalize().unwrap())
            .collect()
    };
    let all = real(&Dataset::open(&common::sample(), Split::Train).unwrap());
    let (f, s) = (real(&fit), real(&sel));
    assert!(f.is_disjoint(&s), "a selection image is also trained on");
    assert_eq!(f.union(&s).cloned().collect::<HashSet<_>>(), all);
    let seen = open("seen", Split::Train);
    let udb = open("unseen-db", Split::Train);
    let uq = open("unseen-q", Split::Val);
    assert_eq!((seen.classes.len(), seen.items.len()), (8, 240));
    assert_eq!((udb.classes.len(), udb.items.len()), (2, 60));
    let ids =
        |ds: &Dataset| -> HashSet<String> { ds.classes.iter().map(|c| c.id.clone()).collect() };
    assert!(ids(&seen).is_disjoint(&ids(&udb)));
    assert_eq!(ids(&uq), ids(&udb));
    // Every val image of the unseen classes, and nothing else.
    let val = Dataset::open(&common::sample(), Split::Val).unwrap();
    let want = val
        .items
        .iter()
        .filter(|i| ids(&udb).contains(&val.classes[i.class].id))
        .count();
    assert!(want > 0);
    assert_eq!(uq.items.len(), want);
    // A folder that is not a Tiny ImageNet root.
    let bad = dir.path().join("not-a-root");
    std::fs::create_dir_all(&bad).unwrap();
    let o = run(&bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("wnids.txt is missing"), "{err}");
}
