//! The GPU path (`--features gpu`: burn's wgpu backend on Vulkan) on the machine's Vulkan device —
//! in CI, Mesa's lavapipe, a software Vulkan device that runs on the CPU (`.ci/run` installs
//! `mesa-vulkan-drivers`). Embeddings on `--device vulkan` must equal the CPU engine's within 1e-3
//! (pretrained and trained runs), and training on the device must run and lower the loss.
#![cfg(feature = "gpu")]

mod common;

use deeprank::store::npy::NpyMap;
use std::path::Path;

fn sample() -> String {
    common::sample().to_str().unwrap().to_string()
}

/// `deeprank --device DEVICE embed` of the sample's 60 val images at 64 px into `out`.
fn embed(device: &str, out: &Path, model: &str) {
    let (code, _, err) = common::cli(&[
        "--device",
        device,
        "embed",
        "--data",
        &sample(),
        "--split",
        "val",
        "--out",
        out.to_str().unwrap(),
        "--size",
        "64",
        "--model",
        model,
    ]);
    assert_eq!(code, 0, "embed on {device}: {err}");
}

/// Largest absolute difference between two DBs' vectors, which must have the same shape.
fn max_diff(a: &Path, b: &Path) -> f32 {
    let a = NpyMap::open(&a.join("vectors.npy")).unwrap();
    let b = NpyMap::open(&b.join("vectors.npy")).unwrap();
    assert_eq!((a.rows, a.dim), (b.rows, b.dim));
    assert!(a.rows > 0);
    a.data()
        .iter()
        .zip(b.data())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Trains a run on the CPU or the GPU on the sample at 64 px; returns its per-epoch mean losses.
fn train(device: &str, run: &Path, extra: &[&str]) -> Vec<f64> {
    let data = sample();
    let mut args = vec![
        "--device",
        device,
        "train",
        "--data",
        &data,
        "--out",
        run.to_str().unwrap(),
        "--size",
        "64",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = common::cli(&args);
    assert_eq!(code, 0, "train on {device} {extra:?}: {err}");
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "mean_loss").unwrap();
    lines
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn vulkan_pretrained_embeddings_equal_the_cpu_engine() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let (cpu, gpu) = (dir.path().join("cpu"), dir.path().join("gpu"));
    embed("cpu", &cpu, "pretrained");
    embed("vulkan", &gpu, "pretrained");
    let d = max_diff(&cpu, &gpu);
    eprintln!("pretrained, vulkan vs cpu: max |diff| {d:e}");
    assert!(d < 1e-3, "pretrained, vulkan vs cpu: max |diff| {d}");
}

#[test]
fn vulkan_trained_run_embeddings_equal_the_cpu_engine() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let runs: [(&str, &[&str]); 4] = [
        ("classes head", &[]),
        ("plain head", &["--arch", "lite0"]),
        ("blocks", &["--freeze-blocks", "15", "--cache", "false"]),
        (
            "multiscale",
            &[
                "--arch",
                "multiscale",
                "--freeze-blocks",
                "16",
                "--cache",
                "false",
            ],
        ),
    ];
    for (name, extra) in runs {
        let name = name.replace(' ', "-");
        let run = dir.path().join(format!("run-{name}"));
        let mut args = vec!["--epochs", "1", "--steps-per-epoch", "2"];
        args.extend_from_slice(extra);
        train("cpu", &run, &args);
        let cpu = dir.path().join(format!("cpu-{name}"));
        let gpu = dir.path().join(format!("gpu-{name}"));
        embed("cpu", &cpu, run.to_str().unwrap());
        embed("vulkan", &gpu, run.to_str().unwrap());
        let d = max_diff(&cpu, &gpu);
        eprintln!("trained run ({name}), vulkan vs cpu: max |diff| {d:e}");
        assert!(
            d < 1e-3,
            "trained run ({name}), vulkan vs cpu: max |diff| {d}"
        );
    }
}

#[test]
fn vulkan_training_runs_and_lowers_the_loss() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    // The default recipe on the device: the frozen backbone's features computed there, the head
    // trained there.
    let loss = train(
        "vulkan",
        &dir.path().join("head"),
        &["--epochs", "4", "--steps-per-epoch", "15", "--batch", "32"],
    );
    eprintln!("head on vulkan, mean loss per epoch: {loss:?}");
    assert_eq!(loss.len(), 4);
    assert!(loss[3] < loss[0], "loss on vulkan should fall: {loss:?}");
    // The last blocks trained on the device through burn's autodiff follow the CPU's training
    // pass step for step (same data, same seed), within float rounding.
    let args = [
        "--freeze-blocks",
        "15",
        "--cache",
        "false",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--batch",
        "16",
    ];
    let on_gpu = train("vulkan", &dir.path().join("blocks-gpu"), &args);
    let on_cpu = train("cpu", &dir.path().join("blocks-cpu"), &args);
    eprintln!("last blocks, mean loss per epoch: vulkan {on_gpu:?}, cpu {on_cpu:?}");
    assert_eq!(on_gpu.len(), 2);
    for (g, c) in on_gpu.iter().zip(&on_cpu) {
        assert!(
            g.is_finite() && (g - c).abs() <= 0.02 * c.abs(),
            "vulkan {on_gpu:?} vs cpu {on_cpu:?}"
        );
    }
}

/// A GPU build on a machine without a Vulkan driver says so, and what to install, instead of
/// panicking at the first tensor.
#[test]
fn vulkan_without_a_driver_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("db");
    let (code, _, err) = common::cli_env(
        &[
            "--device",
            "vulkan",
            "embed",
            "--data",
            &sample(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("VK_ICD_FILENAMES", "/nonexistent/icd.json")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--device vulkan: no usable Vulkan device")
            && err.contains("mesa-vulkan-drivers"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing is written");
}
