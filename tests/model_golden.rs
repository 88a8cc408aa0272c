//! The Rust EfficientNet-Lite0 against logits PyTorch computed from the same weights and inputs
//! (tests/fixtures/make_golden.py), and the Rust decode + resize against PIL's.

mod common;

use deeprank::data::transform;
use deeprank::infer::embedder::Embedder;
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("golden/logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn logits_match_pytorch() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    let w = common::weights();
    for size in [64u32, 128, 224] {
        let emb = Embedder::pretrained(Some(&w), size, false).unwrap();
        let mine: Vec<&Value> = cases
            .iter()
            .filter(|c| c["size"].as_u64() == Some(size as u64))
            .collect();
        let n = mine.len();
        let per = 3 * (size * size) as usize;
        let mut buf = vec![0f32; n * per];
        for (i, c) in mine.iter().enumerate() {
            let png = common::fixtures()
                .join("golden")
                .join(c["input_png"].as_str().unwrap());
            let img = transform::load_rgb(&png).unwrap();
            assert_eq!(img.width(), size);
            transform::normalise_chw(&img, &mut buf[i * per..(i + 1) * per]).unwrap();
        }
        let logits = emb.logits_batch(buf, n).unwrap();
        for (i, c) in mine.iter().enumerate() {
            let want: Vec<f32> = c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = &logits[i * 1000..(i + 1) * 1000];
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let rel = err / scale;
            assert!(
                rel < 1e-3,
                "{} at {size}px: max |Δlogit| / max |logit| = {rel:.2e}",
                c["input_png"]
            );
            let top = got
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(
                top as u64,
                c["top5"][0].as_u64().unwrap(),
                "top-1 class differs for {}",
                c["input_png"]
            );
        }
    }
}

/// deeprank's CPU engine (what `embed` runs on the CPU: BatchNorm folded, channels-last, its own
/// kernels) against PyTorch at 224 px, the default recipe's size: the full pooled 1280-d features
/// of four real images (`pooled224.json`, written by tests/fixtures/make_golden.py from the same
/// PNG inputs). Bound: max |Δ| ≤ 1e-5 × the largest feature, per image. Both sides are f32 with
/// different summation orders (im2col + gemm, BatchNorm folded into the weights, vs PyTorch's
/// convolutions with BatchNorm applied), so rounding alone leaves 1.3e-6–1.8e-6 of the scale
/// (measured, AVX-512; the bound leaves ~6× for other SIMD paths and thread counts); a wrong
/// kernel — padding, stride, a BatchNorm ε, a ReLU6 clamp, pooling — moves features by 1e-3 or
/// more of the scale.
#[test]
fn engine_pooled_features_match_pytorch_at_224() {
    use deeprank::cpu::engine::Engine;
    let text = std::fs::read_to_string(common::fixtures().join("golden/pooled224.json")).unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fx["size"], 224);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let size = 224usize;
    let per = 3 * size * size;
    let n = cases.len();
    let mut buf = vec![0f32; n * per];
    for (i, c) in cases.iter().enumerate() {
        let png = common::fixtures()
            .join("golden")
            .join(c["input_png"].as_str().unwrap());
        let img = transform::load_rgb(&png).unwrap();
        assert_eq!(img.width(), size as u32);
        transform::normalise_chw(&img, &mut buf[i * per..(i + 1) * per]).unwrap();
    }
    let w = common::weights();
    let dev = deeprank::model::device::device();
    let engine = Engine::new(
        &deeprank::model::weights::load(&w, deeprank::model::lite::Backbone::Lite0, &dev).unwrap(),
    )
    .unwrap();
    let got_engine = engine.pooled(&buf, n, size);
    // And what the embedder runs in this build (the engine on the CPU), unnormalised.
    let got_embed = Embedder::pretrained(Some(&w), 224, false)
        .unwrap()
        .embed_batch(&buf, n)
        .unwrap();
    for (what, got) in [("engine", &got_engine), ("embedder", &got_embed)] {
        assert_eq!(got.len(), n * 1280, "{what}");
        for (i, c) in cases.iter().enumerate() {
            let want: Vec<f32> = c["pooled"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(want.len(), 1280);
            let rel = rel_err(&want, &got[i * 1280..(i + 1) * 1280]);
            eprintln!("{what} {}: max |Δ| / max = {rel:.2e}", c["input_png"]);
            assert!(
                rel <= 1e-5,
                "{what} {} at 224 px: max |Δ| / max |feature| = {rel:.2e}",
                c["input_png"]
            );
        }
    }
}

#[test]
fn decode_and_resize_match_pil() {
    let fx = fixture();
    for c in fx["cases"].as_array().unwrap() {
        let size = c["size"].as_u64().unwrap() as u32;
        let src =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(c["source"].as_str().unwrap());
        let mine = transform::resize_rgb(&transform::load_rgb(&src).unwrap(), size).unwrap();
        let pil = transform::load_rgb(
            &common::fixtures()
                .join("golden")
                .join(c["input_png"].as_str().unwrap()),
        )
        .unwrap();
        let diffs: Vec<i32> = mine
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        let max = *diffs.iter().max().unwrap();
        assert!(
            mean < 0.5 && max <= 4,
            "{}: mean |Δ| {mean:.3}, max {max} levels vs PIL",
            c["input_png"]
        );
    }
}

#[test]
fn classifier_recognises_sample_val_images() {
    // ImageNet top-1 restricted to the 10 sample classes, on the 60 bundled val images at 128 px.
    let ds = deeprank::data::dataset::Dataset::open(
        &common::sample(),
        deeprank::data::dataset::Split::Val,
    )
    .unwrap();
    let emb = Embedder::pretrained(Some(&common::weights()), 128, false).unwrap();
    let wnids = common::fixtures().join("imagenet1k_wnids.txt");
    let r = deeprank::search::eval::imagenet_top1(&emb, &ds, &wnids, 32).unwrap();
    assert_eq!(r.images, 60);
    assert!(r.top1 > 0.7, "top-1 on the sample val = {:.3}", r.top1);
}

#[test]
fn safetensors_weights_load_like_the_pth() {
    use burn::store::{ModuleSnapshot, SafetensorsStore};
    let dev = deeprank::model::device::device();
    let w = common::weights();
    let model =
        deeprank::model::weights::load(&w, deeprank::model::lite::Backbone::Lite0, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("lite0.safetensors");
    model
        .save_into(&mut SafetensorsStore::from_file(&st))
        .unwrap();
    let a = Embedder::pretrained(Some(&w), 64, false).unwrap();
    let b = Embedder::pretrained(Some(&st), 64, false).unwrap();
    let img = transform::load_rgb(&common::sample().join("val/images/val_68.JPEG")).unwrap();
    let mut x = vec![0f32; 3 * 64 * 64];
    transform::normalise_chw(&img, &mut x).unwrap();
    let la = a.logits_batch(x.clone(), 1).unwrap();
    let lb = b.logits_batch(x, 1).unwrap();
    let d = la
        .iter()
        .zip(&lb)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(d < 1e-5, "safetensors vs pth logits differ by {d}");
    // Weights of another shape are refused with a message, not a panic.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    assert!(
        deeprank::model::weights::load(&bad, deeprank::model::lite::Backbone::Lite0, &dev).is_err()
    );
}

#[test]
fn folded_batchnorm_path_matches_the_plain_network() {
    let dev = deeprank::model::device::device();
    let model = lite0(&dev);
    let fused = deeprank::infer::fused::FusedLite::new(&model).unwrap();
    for size in [64usize, 128] {
        // Real images and random inputs.
        let x = mixed_inputs(size);
        let t = || {
            burn::tensor::Tensor::<4>::from_data(
                burn::tensor::TensorData::new(x.clone(), [3, 3, size, size]),
                &dev,
            )
        };
        let a = model.pooled(t()).into_data().try_to_vec::<f32>().unwrap();
        let b = fused.pooled(t()).into_data().try_to_vec::<f32>().unwrap();
        let e = rel_err(&a, &b);
        assert!(e < 1e-4, "{size}px: max |Δ| / max = {e:.2e}");
    }
}

/// The test weights' Lite0 on `dev`.
fn lite0(dev: &burn::prelude::Device) -> deeprank::model::lite::Lite {
    deeprank::model::weights::load(
        &common::weights(),
        deeprank::model::lite::Backbone::Lite0,
        dev,
    )
    .unwrap()
}

/// Real images and a random image at `size` px, `[3][3][size][size]`.
fn mixed_inputs(size: usize) -> Vec<f32> {
    let mut x = Vec::new();
    for f in ["val_68.JPEG", "val_8.JPEG"] {
        let img = transform::resize_rgb(
            &transform::load_rgb(&common::sample().join("val/images").join(f)).unwrap(),
            size as u32,
        )
        .unwrap();
        let mut v = vec![0f32; 3 * size * size];
        transform::normalise_chw(&img, &mut v).unwrap();
        x.extend(v);
    }
    let mut s = 7u32;
    x.extend((0..3 * size * size).map(|_| {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
    }));
    x
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    err / scale
}

#[test]
fn cpu_engine_matches_the_plain_network() {
    use deeprank::cpu::engine::{Engine, Output};
    use deeprank::model::net::{Arch, EmbedNet};
    let dev = deeprank::model::device::device();
    let model = lite0(&dev);
    let engine = Engine::new(&model).unwrap();
    for size in [64usize, 96, 128] {
        let x = mixed_inputs(size);
        let t = || {
            burn::tensor::Tensor::<4>::from_data(
                burn::tensor::TensorData::new(x.clone(), [3, 3, size, size]),
                &dev,
            )
        };
        let a = model.pooled(t()).into_data().try_to_vec::<f32>().unwrap();
        let b = engine.pooled(&x, 3, size);
        let e = rel_err(&a, &b);
        assert!(e < 1e-4, "{size}px pooled: max |Δ| / max = {e:.2e}");
        // A lone image (its layers' rows split over the threads) gives the bits it gives in a batch.
        let per = 3 * size * size;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for i in 0..3 {
                let one = pool.install(|| engine.pooled(&x[i * per..(i + 1) * per], 1, size));
                let want = &b[i * 1280..(i + 1) * 1280];
                assert!(
                    one.iter()
                        .zip(want)
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{size}px image {i} alone on {threads} threads differs from it in a batch"
                );
            }
        }
        // Every cut level the trainer caches (block outputs, NCHW).
        let net = EmbedNet::new(model.clone(), Arch::Lite0, 8, true, &dev);
        for level in [1usize, 2, 5, 9, 16] {
            let a = net
                .prefix(t(), level)
                .trunk
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let b = engine.run(&x, 3, size, Output::Blocks(level));
            let e = rel_err(&a, &b);
            assert!(e < 1e-4, "{size}px level {level}: max |Δ| / max = {e:.2e}");
        }
    }
}

/// Fused blocks (one image per thread: expand → depthwise → project band by band) give the bits
/// of the layer-by-layer order, for the pooled features and at every block, at sizes where
/// different blocks fuse, with bands that do not divide the side (100 px: 25 rows after block 1).
#[test]
fn fused_blocks_give_the_layer_by_layer_bits() {
    use deeprank::cpu::engine::{Engine, Output};
    let dev = deeprank::model::device::device();
    let model = lite0(&dev);
    let mut engine = Engine::new(&model).unwrap();
    for size in [100usize, 128, 224] {
        let x = mixed_inputs(size);
        for output in [
            Output::Pooled,
            Output::BlocksNhwc(2),
            Output::BlocksNhwc(4),
            Output::BlocksNhwc(11),
        ] {
            engine.set_fused(true);
            let fused = engine.run(&x, 3, size, output);
            engine.set_fused(false);
            let plain = engine.run(&x, 3, size, output);
            let differ = fused
                .iter()
                .zip(&plain)
                .filter(|(p, q)| p.to_bits() != q.to_bits())
                .count();
            assert!(
                differ == 0 && fused.len() == plain.len(),
                "{size}px {output:?}: {differ} of {} values differ",
                plain.len()
            );
        }
    }
}

/// A batch's small-map tail run over groups of images (cpu/engine/group.rs) gives the same bits as
/// one image at a time: 20 images (the mixed three, then scaled copies) on 1 and 2 threads, so
/// groups of 5, and of 3 with a short last one, at sides whose tails start at different blocks.
#[test]
fn grouped_tail_gives_the_one_image_bits() {
    use deeprank::cpu::engine::{Engine, Output};
    let dev = deeprank::model::device::device();
    let model = lite0(&dev);
    let mut engine = Engine::new(&model).unwrap();
    for size in [64usize, 100, 128, 224] {
        let three = mixed_inputs(size);
        let n = 20;
        let x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let img = &three[(i % 3) * 3 * size * size..][..3 * size * size];
                img.iter().map(move |v| v * (1.0 - 0.03 * i as f32))
            })
            .collect();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (grouped, alone) = pool.install(|| {
                engine.set_grouped(true);
                let g = engine.run(&x, n, size, Output::Pooled);
                engine.set_grouped(false);
                let a = engine.run(&x, n, size, Output::Pooled);
                (g, a)
            });
            let differ = grouped
                .iter()
                .zip(&alone)
                .filter(|(p, q)| p.to_bits() != q.to_bits())
                .count();
            assert!(
                differ == 0 && grouped.len() == alone.len() && grouped.len() == n * 1280,
                "{size}px, {threads} threads: {differ} of {} values differ",
                alone.len()
            );
        }
    }
}

/// The stem's im2col equals the per-value definition (zero outside the image) at even and odd
/// sides from 2 to 13, whole and in two parts of rows cut anywhere.
#[test]
fn stem_im2col_equals_its_definition() {
    use deeprank::cpu::engine::{stem_im2col, stem_im2col_rows};
    for side in 2usize..=13 {
        let x: Vec<f32> = (0..3 * side * side).map(|i| i as f32 + 0.5).collect();
        let ho = side / 2;
        let mut col = vec![f32::NAN; ho * ho * 27];
        stem_im2col(&x, side, &mut col);
        for (p, r) in col.chunks_exact(27).enumerate() {
            let (oy, ox) = (p / ho, p % ho);
            for (t, v) in r.iter().enumerate() {
                let (ci, ky, kx) = (t / 9, t / 3 % 3, t % 3);
                let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                let inside = iy >= 0 && ix >= 0 && (iy as usize) < side && (ix as usize) < side;
                let want = if inside {
                    x[ci * side * side + iy as usize * side + ix as usize]
                } else {
                    0.0
                };
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "side {side}, pixel {p}, tap {t}"
                );
            }
        }
        for cut in 0..=ho {
            let mut parts = vec![f32::NAN; ho * ho * 27];
            let (top, bottom) = parts.split_at_mut(cut * ho * 27);
            stem_im2col_rows(&x, side, 0..cut, top);
            stem_im2col_rows(&x, side, cut..ho, bottom);
            let same = parts
                .iter()
                .zip(&col)
                .all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "side {side}: rows cut at {cut}");
        }
    }
}
