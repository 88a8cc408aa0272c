//! Training: end-to-end runs on the bundled sample, every sampling mode, the multiscale network,
//! checkpoints (round trip, SIGKILL + resume), and refusals.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn train_args<'a>(out: &'a str, data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--threads",
        "2",
        "train",
        "--data",
        data,
        "--out",
        out,
        "--size",
        "64",
    ];
    v.extend_from_slice(extra);
    v
}

fn metrics(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn sample() -> String {
    common::sample().to_str().unwrap().to_string()
}

#[test]
fn tiny_training_lowers_the_loss_and_the_run_embeds() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (data, out) = (sample(), run.to_str().unwrap().to_string());
    let (code, stdout, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--val",
            &data,
            "--epochs",
            "4",
            "--steps-per-epoch",
            "15",
            "--batch",
            "32",
            "--views",
            "2",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("trained 4 epochs"), "{stdout}");
    let m = metrics(&run);
    assert_eq!(m.len(), 4);
    let loss: Vec<f64> = m.iter().map(|r| r[3].parse().unwrap()).collect();
    assert!(loss[3] < loss[0], "loss should fall: {loss:?}");
    let p30_last: f64 = m[3][8].parse().unwrap();
    assert!(p30_last > 0.4, "val P@30 after training: {p30_last}");
    assert!(image::open(run.join("plot.png")).is_ok());
    // The run is a model for embed / query / eval.
    let db = dir.path().join("db");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        &data,
        "--out",
        db.to_str().unwrap(),
        "--model",
        &out,
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["dim"], 128);
    assert!(meta["model"].as_str().unwrap().starts_with("run:"));
    let (code, out_json, err) = common::cli(&[
        "eval",
        "--db",
        db.to_str().unwrap(),
        "--queries",
        &data,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out_json).unwrap();
    let p30: f64 = v["precision_at_k"]["30"].as_f64().unwrap();
    assert!(
        (p30 - p30_last).abs() < 0.02,
        "eval {p30} vs training's validation {p30_last}"
    );
    let img = common::sample().join("val/images/val_68.JPEG");
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--top",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
    // A pretrained query against the run's DB is refused.
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db.to_str().unwrap(),
        "--model",
        "pretrained",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("was made with model run:"), "{err}");
}

#[test]
fn every_sampling_mode_and_the_multiscale_network_train() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let data = sample();
    let trip = dir.path().join("triplets.txt");
    let (code, _, err) = common::cli(&["sample", "--data", &data, "--out", trip.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "file",
            vec!["--triplets", trip.to_str().unwrap(), "--batch", "8"],
        ),
        ("random", vec!["--sampling", "random", "--batch", "8"]),
        (
            "batch-hard",
            vec!["--sampling", "batch-hard", "--batch", "16"],
        ),
        (
            "semi-hard",
            vec!["--sampling", "semi-hard", "--batch", "16"],
        ),
        // On-the-fly augmentation through trainable blocks (no cache), SGD, train-mode BN.
        (
            "blocks",
            vec![
                "--freeze-blocks",
                "14",
                "--cache",
                "false",
                "--optimizer",
                "sgd",
                "--bn",
                "train",
                "--batch",
                "16",
            ],
        ),
        (
            "multiscale",
            vec![
                "--arch",
                "multiscale",
                "--freeze-blocks",
                "16",
                "--batch",
                "16",
            ],
        ),
        (
            "seed",
            vec!["--recipe", "seed", "--batch", "4", "--dim", "64"],
        ),
    ];
    for (name, extra) in cases {
        let run = dir.path().join(name);
        let out = run.to_str().unwrap().to_string();
        let mut a = train_args(&out, &data, &["--epochs", "1", "--steps-per-epoch", "3"]);
        a.extend(extra);
        let (code, _, err) = common::cli(&a);
        assert_eq!(code, 0, "{name}: {err}");
        let m = metrics(&run);
        assert_eq!(m.len(), 1, "{name}");
        assert!(
            m[0][3].parse::<f64>().unwrap().is_finite(),
            "{name}: {:?}",
            m[0]
        );
        assert!(m[0][2].parse::<usize>().unwrap() > 0, "{name}: no triplets");
    }
}

#[test]
fn resume_continues_and_a_changed_config_is_refused() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (data, out) = (sample(), run.to_str().unwrap().to_string());
    let base = ["--epochs", "1", "--steps-per-epoch", "4", "--batch", "16"];
    let (code, _, err) = common::cli(&train_args(&out, &data, &base));
    assert_eq!(code, 0, "{err}");
    // Starting again in the same folder is refused; so is resuming with another config.
    let (code, _, err) = common::cli(&train_args(&out, &data, &base));
    assert_eq!(code, 1);
    assert!(err.contains("--resume"), "{err}");
    let (code, _, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--resume",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "4",
            "--batch",
            "16",
            "--dim",
            "64",
        ],
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("another config") && err.contains("dim"),
        "{err}"
    );
    // More epochs of the same config continue from the checkpoint.
    let (code, _, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--resume",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "4",
            "--batch",
            "16",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming at epoch 2 step 0 (global step 4)"),
        "{err}"
    );
    assert_eq!(metrics(&run).len(), 2);
}

#[test]
fn sigkill_mid_epoch_then_resume_loses_at_most_the_unsaved_steps() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (data, out) = (sample(), run.to_str().unwrap().to_string());
    let args = train_args(
        &out,
        &data,
        &[
            "--epochs",
            "2",
            "--steps-per-epoch",
            "300",
            "--batch",
            "16",
            "--save-every",
            "10",
            "--freeze-blocks",
            "15",
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .args(&args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut last_saved = 0usize;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(s) = line.strip_prefix("checkpoint: global step ") {
            last_saved = s.trim().parse().unwrap();
            if last_saved >= 30 {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
    }
    child.wait().unwrap();
    assert!(last_saved >= 30, "no mid-epoch checkpoint was written");
    assert!(
        !run.join("metrics.csv").exists(),
        "killed before the first epoch ended"
    );
    let (code, _, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--resume",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "300",
            "--batch",
            "16",
            "--save-every",
            "10",
            "--freeze-blocks",
            "15",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    let resumed_at: usize = err
        .lines()
        .find_map(|l| l.split("(global step ").nth(1))
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {err}"));
    assert!(
        resumed_at >= last_saved,
        "resumed at {resumed_at}, last checkpoint {last_saved}"
    );
    let m = metrics(&run);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0][1], "300");
    assert_eq!(m[1][1], "300");
}

#[test]
fn divergence_stops_with_the_last_good_checkpoint_kept() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (data, out) = (sample(), run.to_str().unwrap().to_string());
    let (code, _, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch",
            "16",
            "--normalize",
            "false",
            "--sampling",
            "random",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(run.join("checkpoint.bin")).unwrap();
    let (code, _, err) = common::cli(&train_args(
        &out,
        &data,
        &[
            "--resume",
            "--force",
            "--epochs",
            "3",
            "--steps-per-epoch",
            "20",
            "--batch",
            "16",
            "--normalize",
            "false",
            "--sampling",
            "random",
            "--lr",
            "1e30",
            "--save-every",
            "0",
        ],
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the loss became") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.bin")).unwrap(),
        before,
        "the good checkpoint is untouched"
    );
}

#[test]
fn bad_training_flags_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (data, out) = (sample(), out.to_str().unwrap().to_string());
    for (extra, msg) in [
        (vec!["--gap", "0"], "--gap must be positive"),
        (vec!["--gap=-1"], "--gap must be positive"),
        (vec!["--sampling", "file"], "--triplets"),
        (vec!["--freeze-blocks", "18"], "--freeze-blocks"),
        (vec!["--size", "50"], "--size 50"),
        (
            vec![
                "--freeze-blocks",
                "0",
                "--cache",
                "false",
                "--batch",
                "100000",
                "--size",
                "512",
                "--sampling",
                "random",
            ],
            "lower --batch",
        ),
    ] {
        let mut a = train_args(&out, &data, &[]);
        a.retain(|x| *x != "--size" && *x != "64");
        a.extend(extra.iter().copied());
        if !extra.contains(&"--size") {
            a.extend(["--size", "64"]);
        }
        let (code, _, err) = common::cli(&a);
        assert_ne!(code, 0, "{extra:?}");
        assert!(
            err.contains(msg) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
    let (code, _, err) = common::cli(&["train", "--data", "/no/such", "--out", &out]);
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn unreadable_training_images_are_skipped_and_counted() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::class_folders(&data, 3, 6);
    std::fs::write(data.join("n01443537").join("broken.jpg"), b"not a jpeg").unwrap();
    let run = dir.path().join("run");
    let (code, _, err) = common::cli(&train_args(
        run.to_str().unwrap(),
        data.to_str().unwrap(),
        &[
            "--epochs",
            "1",
            "--steps-per-epoch",
            "3",
            "--batch",
            "12",
            "--per-class",
            "3",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("broken.jpg") && err.contains("skipped 1 unreadable images"),
        "{err}"
    );
    assert_eq!(metrics(&run).len(), 1);
}
