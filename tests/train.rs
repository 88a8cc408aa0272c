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

/// Gradients (and BatchNorm running averages) of one step through deeprank's own backbone pass
/// (`cpu::pass`, through `train::glue`) against burn's autodiff of the same network: full fine-tuning with frozen
/// BatchNorm (every convolution, depthwise and ReLU6 backward; relative error ~1e-6 measured, 1e-4
/// allowed), full and partial fine-tuning with BatchNorm in training mode (~1e-5 in the upper
/// blocks; up to ~2e-3 below block 5, where a ReLU6 input within rounding of 0 or 6 falls on the
/// other side of the mask and the batch-statistics backward amplifies it; 1e-2 allowed, still far
/// below what a wrong formula gives), and a frozen prefix.
#[test]
fn fast_backbone_pass_matches_burns_autodiff() {
    use burn::prelude::*;
    use deeprank::model::net::POOLED_LEVEL;
    use deeprank::train::config::{BnMode, Recipe, TrainConfig, build_net};
    use deeprank::train::optim::apply_freeze;
    use deeprank::train::{glue, loss};

    let w = common::weights();
    let size = 64usize;
    let images: Vec<std::path::PathBuf> = std::fs::read_dir(common::sample().join("val/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .take(6)
        .collect();
    let (buf, ok, _) = deeprank::data::batch::decode_batch(&images, size as u32);
    assert_eq!(ok.iter().filter(|&&o| o).count(), 6);
    let ad = deeprank::model::device::device().autodiff();

    for (freeze, bn) in [
        (0usize, BnMode::Frozen),
        (0, BnMode::Train),
        (9, BnMode::Frozen),
        (16, BnMode::Train),
    ] {
        let tol = if bn == BnMode::Train { 1e-2 } else { 1e-4 };
        let mut cfg = TrainConfig::recipe(Recipe::Seed, common::sample());
        cfg.weights = Some(w.clone());
        cfg.size = size as u32;
        cfg.dim = 16;
        cfg.freeze_blocks = freeze;
        cfg.bn = bn;
        let level = cfg.level();
        let step = |fast_path: bool| {
            let model = apply_freeze(build_net(&cfg, &ad).unwrap(), &cfg).unwrap();
            let mut pending = None;
            let emb = if fast_path {
                let (input, p) = glue::prefix(
                    &model,
                    buf.clone(),
                    6,
                    size,
                    level,
                    bn == BnMode::Train,
                    &ad,
                )
                .unwrap();
                pending = Some(p);
                model.suffix(input, POOLED_LEVEL)
            } else {
                let x =
                    Tensor::<4>::from_data(TensorData::new(buf.clone(), [6, 3, size, size]), &ad);
                model.suffix(model.prefix(x, level), level)
            };
            let q = emb.clone().narrow(0, 0, 2);
            let p = emb.clone().narrow(0, 2, 2);
            let n = emb.narrow(0, 4, 2);
            let l = loss::ranking_loss(loss::row_dist(q.clone(), p), loss::row_dist(q, n), 1.0);
            let lv: f32 = l.clone().into_scalar();
            let g = l.backward();
            let grads = match pending {
                Some(p) => p.gradients(g, &model).unwrap(),
                None => burn::optim::GradientsParams::from_grads(g, &model),
            };
            (model, grads, lv)
        };
        let (m_fast, g_fast, l_fast) = step(true);
        let (m_burn, g_burn, l_burn) = step(false);
        assert!(l_burn > 0.0, "the test needs a non-zero loss");
        assert!(
            (l_fast - l_burn).abs() <= 1e-4 * l_burn.abs().max(1.0),
            "freeze {freeze}: loss {l_fast} vs {l_burn}"
        );
        let vals = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        let vals4 = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        let close = |a: &[f32], b: &[f32], what: &str, tol: f32| {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            // Absolute floor: some gradients are zero in exact arithmetic (a β whose shift the
            // next training-mode BatchNorm removes) and only rounding noise here.
            assert!(
                err <= tol * scale + 1e-6,
                "freeze {freeze} {what}: max |Δ| {err:.3e}, scale {scale:.3e}"
            );
            scale
        };
        // Every trainable backbone tensor, and the head.
        let bb = &m_burn.backbone;
        let fb = &m_fast.backbone;
        let mut checked = 0;
        let mut nonzero = 0;
        let mut convs = vec![(
            &bb.conv_head,
            &fb.conv_head,
            &bb.bn1,
            &fb.bn1,
            "head".to_string(),
        )];
        if freeze == 0 {
            convs.push((
                &bb.conv_stem,
                &fb.conv_stem,
                &bb.bn0,
                &fb.bn0,
                "stem".into(),
            ));
        }
        for (i, (b, f)) in bb
            .blocks
            .iter()
            .zip(&fb.blocks)
            .enumerate()
            .skip(level.min(16))
        {
            if let (Some(c), Some(fc), Some(n), Some(fnn)) =
                (&b.expand_conv, &f.expand_conv, &b.bn0, &f.bn0)
            {
                convs.push((c, fc, n, fnn, format!("block {i} expand")));
            }
            convs.push((
                &b.depthwise_conv,
                &f.depthwise_conv,
                &b.bn1,
                &f.bn1,
                format!("block {i} depthwise"),
            ));
            convs.push((
                &b.project_conv,
                &f.project_conv,
                &b.bn2,
                &f.bn2,
                format!("block {i} project"),
            ));
        }
        for (c, fc, n, fnn, what) in convs {
            let gb = vals4(
                g_burn
                    .get::<4>(c.weight.id)
                    .unwrap_or_else(|| panic!("{what}: no burn grad")),
            );
            let gf = vals4(
                g_fast
                    .get::<4>(fc.weight.id)
                    .unwrap_or_else(|| panic!("{what}: no fast grad")),
            );
            if close(&gf, &gb, &format!("{what} weight"), tol) > 0.0 {
                nonzero += 1;
            }
            for (pb, pf, name) in [
                (&n.gamma, &fnn.gamma, "gamma"),
                (&n.beta, &fnn.beta, "beta"),
            ] {
                let gb = vals(g_burn.get::<1>(pb.id).unwrap());
                let gf = vals(g_fast.get::<1>(pf.id).unwrap());
                close(&gf, &gb, &format!("{what} {name}"), tol);
            }
            if bn == BnMode::Train {
                close(
                    &vals(fnn.running_mean.value()),
                    &vals(n.running_mean.value()),
                    &format!("{what} running mean"),
                    1e-4,
                );
                close(
                    &vals(fnn.running_var.value()),
                    &vals(n.running_var.value()),
                    &format!("{what} running var"),
                    1e-4,
                );
            }
            checked += 1;
        }
        let hb = m_burn
            .head
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let hf = m_fast
            .head
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        close(&hf, &hb, "head init", 0.0);
        let gb = g_burn
            .get::<2>(m_burn.head.weight.id)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let gf = g_fast
            .get::<2>(m_fast.head.weight.id)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        close(&gf, &gb, "embedding head weight", 1e-3);
        assert!(
            checked >= 1 && nonzero >= 1,
            "freeze {freeze}: nothing compared"
        );
        // Nothing frozen got a gradient.
        assert_eq!(
            g_fast
                .get::<4>(fb.blocks[0].depthwise_conv.weight.id)
                .is_some(),
            freeze == 0
        );
    }
}
