//! EfficientNet-Lite1 and Lite2 (`--backbone`): their logits and deeprank's CPU engine against
//! PyTorch (tests/fixtures/golden/lite12.json, written by `bench/torch_lite_anchor.py golden` from
//! an independent PyTorch definition loaded strictly from the same weights), the engine at cut
//! levels Lite0 does not have, the backbone in the model identity (a DB embedded with one is
//! refused with another), and a short `train --backbone lite1` run used by `embed --model RUN`.

mod common;

use deeprank::data::transform;
use deeprank::infer::embedder::Embedder;
use deeprank::model::lite::Backbone;
use serde_json::Value;
use std::path::Path;

fn rel_err(want: &[f32], got: &[f32]) -> f32 {
    assert_eq!(want.len(), got.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = want
        .iter()
        .zip(got)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    err / scale
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The derived block configs are the checkpoints' (the PyTorch side loads them strictly).
#[test]
fn block_configs_are_the_checkpoints() {
    let text = std::fs::read_to_string(common::fixtures().join("golden/lite12.json")).unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    for b in [Backbone::Lite1, Backbone::Lite2] {
        let f = &fx["backbones"][b.name()];
        assert_eq!(f["blocks"].as_u64().unwrap() as usize, b.blocks(), "{b:?}");
        let want: Vec<Vec<usize>> = serde_json::from_value(f["stages"].clone()).unwrap();
        let got: Vec<Vec<usize>> = b
            .stages()
            .iter()
            .map(|&(t, c, n, s, k)| vec![t, c, n, s, k])
            .collect();
        assert_eq!(got, want, "{b:?} stages");
        // And the loaded network has those shapes, every tensor of the file used.
        let dev = deeprank::model::device::device();
        let m = deeprank::model::weights::load(&common::weights_for(b), b, &dev).unwrap();
        assert_eq!(m.blocks.len(), b.blocks());
        assert_eq!(m.backbone, b);
    }
}

/// Logits (what `classify` runs) and the CPU engine's pooled features (what `embed` runs) of two
/// real images at 224 px against PyTorch: logits within 1e-3 of the largest, top-1 equal; pooled
/// features within 1e-5 of the largest (as Lite0's golden test: rounding alone leaves ~2e-6).
#[test]
fn lite1_and_lite2_match_pytorch() {
    let text = std::fs::read_to_string(common::fixtures().join("golden/lite12.json")).unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    let size = 224usize;
    for b in [Backbone::Lite1, Backbone::Lite2] {
        let cases = fx["backbones"][b.name()]["cases"].as_array().unwrap();
        let n = cases.len();
        assert!(n >= 2);
        let per = 3 * size * size;
        let mut buf = vec![0f32; n * per];
        for (i, c) in cases.iter().enumerate() {
            let png = common::fixtures()
                .join("golden")
                .join(c["input_png"].as_str().unwrap());
            let img = transform::load_rgb(&png).unwrap();
            transform::normalise_chw(&img, &mut buf[i * per..(i + 1) * per]).unwrap();
        }
        let emb =
            Embedder::pretrained_backbone(b, Some(&common::weights_for(b)), 224, false).unwrap();
        assert!(
            emb.identity
                .starts_with(&format!("efficientnet-{}:", b.name()))
        );
        let logits = emb.logits_batch(buf.clone(), n).unwrap();
        let pooled = emb.embed_batch(&buf, n).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let want = floats(&c["logits"]);
            let got = &logits[i * 1000..(i + 1) * 1000];
            let rel = rel_err(&want, got);
            eprintln!("{b:?} {} logits: {rel:.2e}", c["input_png"]);
            assert!(rel < 1e-3, "{b:?} {}: logits {rel:.2e}", c["input_png"]);
            let top = got
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0;
            assert_eq!(top as u64, c["top5"][0].as_u64().unwrap(), "{b:?} top-1");
            let want = floats(&c["pooled"]);
            let rel = rel_err(&want, &pooled[i * 1280..(i + 1) * 1280]);
            eprintln!("{b:?} {} engine pooled: {rel:.2e}", c["input_png"]);
            assert!(rel <= 1e-5, "{b:?} {}: pooled {rel:.2e}", c["input_png"]);
        }
    }
}

/// The engine's block outputs at Lite2's deep cut levels (past Lite0's 16) equal burn's network, at
/// 64 px and at Lite2's ImageNet size 260 px (not a multiple of 32: odd feature-map sides).
#[test]
fn engine_cut_levels_of_lite2_match_the_plain_network() {
    use deeprank::cpu::engine::{Engine, Output};
    use deeprank::model::net::{Arch, EmbedNet};
    let b = Backbone::Lite2;
    let dev = deeprank::model::device::device();
    let model = deeprank::model::weights::load(&common::weights_for(b), b, &dev).unwrap();
    let engine = Engine::new(&model).unwrap();
    let net = EmbedNet::new(model, Arch::Lite0, 8, true, &dev);
    assert_eq!(net.pooled_level(), 22);
    for size in [64usize, 260] {
        let img = transform::resize_rgb(
            &transform::load_rgb(&common::sample().join("val/images/val_68.JPEG")).unwrap(),
            size as u32,
        )
        .unwrap();
        let mut x = vec![0f32; 3 * size * size];
        transform::normalise_chw(&img, &mut x).unwrap();
        let t = || {
            burn::tensor::Tensor::<4>::from_data(
                burn::tensor::TensorData::new(x.clone(), [1, 3, size, size]),
                &dev,
            )
        };
        for level in [17usize, 21, 22] {
            let a = net
                .prefix(t(), level)
                .trunk
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let out = if level == 22 {
                Output::Pooled
            } else {
                Output::Blocks(level)
            };
            let got = engine.run(&x, 1, size, out);
            let e = rel_err(&a, &got);
            assert!(e < 1e-4, "{size} px level {level}: {e:.2e}");
        }
    }
}

/// A DB embedded with Lite1 records it: query re-creates Lite1 by itself, Lite0 is refused (by
/// --model and by --backbone), Lite0 weights passed as Lite1's are refused naming the file, and
/// `weights path --backbone` names each backbone's own file.
#[test]
fn the_backbone_is_part_of_the_model_identity() {
    let w1 = common::weights_for(Backbone::Lite1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = common::class_folders(&data, 2, 3);
    let db = dir.path().join("db");
    let (s, d) = (data.to_str().unwrap(), db.to_str().unwrap());
    let w1s = w1.to_str().unwrap();
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        s,
        "--out",
        d,
        "--size",
        "64",
        "--backbone",
        "lite1",
        "--weights",
        w1s,
    ]);
    assert_eq!(code, 0, "{err}");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(db.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["model_source"], "pretrained-lite1", "{meta}");
    assert!(
        meta["model"]
            .as_str()
            .unwrap()
            .starts_with("efficientnet-lite1:"),
        "{meta}"
    );
    let q = files[0].to_str().unwrap();
    // The DB's own model: its nearest neighbour is the query itself.
    let (code, out, err) = common::cli(&[
        "query",
        "--db",
        d,
        "--image",
        q,
        "--top",
        "1",
        "--json",
        "--weights",
        w1s,
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let top = &v[0]["results"][0];
    assert!(top["distance"].as_f64().unwrap() < 1e-3, "{out}");
    assert_eq!(top["path"].as_str(), files[0].to_str(), "{out}");
    // Lite0 is refused, however it is asked for.
    let w0 = common::weights();
    for extra in [
        vec!["--model", "pretrained"],
        vec!["--model", "pretrained", "--weights", w0.to_str().unwrap()],
    ] {
        let mut args = vec!["query", "--db", d, "--image", q];
        args.extend(extra);
        let (code, _, err) = common::cli(&args);
        assert_ne!(code, 0);
        assert!(
            err.contains("efficientnet-lite1") && err.contains("efficientnet-lite0"),
            "{err}"
        );
    }
    let (code, _, err) = common::cli(&[
        "serve",
        "--db",
        d,
        "--backbone",
        "lite0",
        "--weights",
        w0.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("efficientnet-lite1"), "{err}");
    // Lite0's weights as Lite1's: a message naming the file and the way out, not a panic.
    let (code, _, err) = common::cli(&[
        "classify",
        "--data",
        common::sample().to_str().unwrap(),
        "--imagenet-wnids",
        common::fixtures()
            .join("imagenet1k_wnids.txt")
            .to_str()
            .unwrap(),
        "--backbone",
        "lite1",
        "--weights",
        w0.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains(w0.to_str().unwrap())
            && err.contains("--backbone")
            && !err.contains("panicked"),
        "{err}"
    );
    // Lite1/Lite2's ImageNet sizes are not multiples of 32: any even side is taken, an odd one
    // is refused with the rule.
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        s,
        "--out",
        d,
        "--size",
        "225",
        "--backbone",
        "lite1",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--size 225") && err.contains("even side"),
        "{err}"
    );
    for b in Backbone::ALL {
        let (code, out, err) = common::cli(&["weights", "path", "--backbone", b.name()]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.trim()
                .ends_with(deeprank::model::weights::source(b).file_name),
            "{out}"
        );
    }
}

/// A short `train` run (1 epoch of 2 steps) on the sample into `dir/run` with `weights` and the
/// flags `extra`, its own DEEPRANK_HOME and no DEEPRANK_WEIGHTS; returns the run's config.json.
fn train_short(dir: &Path, weights: &Path, extra: &[&str]) -> Value {
    let run = dir.join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .env("DEEPRANK_HOME", dir.join("home"))
        .env_remove("DEEPRANK_WEIGHTS")
        .args(["--threads", "2", "train", "--data"])
        .arg(common::sample())
        .arg("--out")
        .arg(&run)
        .arg("--weights")
        .arg(weights)
        .args(["--epochs", "1", "--steps-per-epoch", "2", "--batch", "16"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

/// `train` with no backbone, size or arch flag trains the default recipe: Lite2 at 256 px with the
/// classes head on the whole frozen backbone (bench/RESULTS.md §3 chose it).
#[test]
fn the_default_recipe_trains_lite2_with_the_classes_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = train_short(dir.path(), &common::weights_for(Backbone::Lite2), &[]);
    assert_eq!(cfg["backbone"], "lite2");
    assert_eq!(cfg["arch"], "classes");
    assert_eq!(cfg["size"], 256);
    assert_eq!(cfg["freeze_blocks"], 22);
}

/// `train --backbone lite1`: the default recipe freezes all 21 blocks (level 22), the run records
/// its backbone, `embed --model RUN` rebuilds Lite1 under the head, and `--backbone lite0` with that
/// run is refused.
#[test]
fn a_run_trained_on_lite1_embeds_with_lite1() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let s = common::sample();
    let w1 = common::weights_for(Backbone::Lite1);
    let cfg = train_short(dir.path(), &w1, &["--backbone", "lite1", "--size", "64"]);
    assert_eq!(cfg["backbone"], "lite1");
    assert_eq!(cfg["freeze_blocks"], 22);
    let db = dir.path().join("db");
    let (r, d) = (run.to_str().unwrap(), db.to_str().unwrap());
    let val = s.join("val");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        val.to_str().unwrap(),
        "--labels",
        "none",
        "--out",
        d,
        "--model",
        r,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        val.to_str().unwrap(),
        "--labels",
        "none",
        "--out",
        dir.path().join("db0").to_str().unwrap(),
        "--model",
        r,
        "--backbone",
        "lite0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("lite1") && err.contains("--backbone"), "{err}");
}
