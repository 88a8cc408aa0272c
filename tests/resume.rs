//! `deeprank train --resume RUN` alone: the data path and every setting come from the run's
//! config.json; only flags given on the resuming command line change them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn config(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

fn epochs_done(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn resume_alone_keeps_the_runs_own_settings() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = run.to_str().unwrap();
    let sample = common::sample();
    // Non-default settings everywhere, 3 epochs (the recipe's default is 15).
    let mut child = Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .args(["--threads", "2", "train", "--data"])
        .arg(&sample)
        .args([
            "--out",
            out,
            "--backbone",
            "lite0",
            "--size",
            "64",
            "--epochs",
            "3",
            "--steps-per-epoch",
            "30",
            "--batch",
            "16",
            "--dim",
            "32",
            "--gap",
            "0.5",
            "--seed",
            "7",
            "--save-every",
            "5",
            "--freeze-blocks",
            "15",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL in the middle of epoch 2 (global step 35 of 90).
    let mut last_saved = 0usize;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(s) = line.strip_prefix("checkpoint: global step ") {
            last_saved = s.trim().parse().unwrap();
            if last_saved >= 35 {
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    assert!(last_saved >= 35, "no checkpoint in epoch 2");
    assert_eq!(epochs_done(&run).len(), 1, "killed during epoch 2");
    let before = config(&run);
    assert_eq!(before["epochs"], 3);
    assert_eq!(before["dim"], 32);

    // `--resume RUN` and nothing else: no --data, no --epochs, no --size ...
    let (code, stdout, err) = common::cli(&["--threads", "2", "train", "--resume", out]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming at epoch 2 step"), "{err}");
    assert!(stdout.contains("trained 3 epochs"), "{stdout}");
    let rows = epochs_done(&run);
    assert_eq!(rows.len(), 3, "stops at the run's own 3 epochs: {rows:?}");
    assert!(rows.iter().all(|r| r.split(',').nth(1) == Some("30")));
    assert_eq!(config(&run), before, "the run's settings are kept");

    // A flag given explicitly changes its setting: one more epoch, the rest kept.
    let (code, stdout, err) =
        common::cli(&["--threads", "2", "train", "--resume", out, "--epochs", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("trained 4 epochs"), "{stdout}");
    let after = config(&run);
    assert_eq!(after["epochs"], 4);
    assert_eq!(
        (&after["dim"], &after["gap"]),
        (&before["dim"], &before["gap"])
    );
    assert_eq!(epochs_done(&run).len(), 4);

    // A flag that changes the model still needs --force.
    let (code, _, err) = common::cli(&["train", "--resume", out, "--dim", "64"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("another config") && err.contains("dim") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        config(&run)["dim"],
        32,
        "a refused resume leaves config.json"
    );

    // A folder that is not a run says so.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = common::cli(&["train", "--resume", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("nothing to resume") && err.contains("config.json"),
        "{err}"
    );
}
