//! Hostile input at scale (issue 12, item 9): a deterministic, seeded mutation test. Thousands of
//! mutated images (JPEG, PNG, WebP lossless/lossy/animated, GIF, BMP, TIFF), weights (`.pth`,
//! `.safetensors`), DB files (`vectors.npy`, `manifest.tsv`, `meta.json`), checkpoints
//! (`checkpoint.bin`: container, state and model record) and multipart upload bodies go to
//! deeprank's readers: first systematic edits of each length/count field and number, then random
//! ones. Each input must end in a value or a clear error: no panic, no hang (a
//! watchdog aborts past 20 s on one input), and memory bounded (a counting allocator checks the
//! peak of live heap bytes while each input is read).
//!
//! `DEEPRANK_HOSTILE_SCALE=N` multiplies the inputs per reader (default 1: a few thousand in all,
//! well under a minute on 2 cores); `DEEPRANK_HOSTILE_SEED` changes the seed. The counts are
//! printed (`cargo test --release --test hostile_input -- --nocapture`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Cursor, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

// ---- a counting allocator: live and peak heap bytes ----

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- deterministic mutations ----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
];
const NUMBERS: [&str; 9] = [
    "0",
    "-1",
    "1",
    "65535",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "3.5",
];

/// A position: half the time in the first 64 bytes, where the headers are.
fn pos(rng: &mut Rng, len: usize) -> usize {
    if rng.below(2) == 0 {
        rng.below(len.min(64))
    } else {
        rng.below(len)
    }
}

/// One to four random edits of `seed` (`other` is spliced from).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(rng.next() as u8);
        }
        let len = v.len();
        match rng.below(10) {
            0 => {
                let i = pos(rng, len);
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = pos(rng, len);
                v[i] = INTERESTING[rng.below(4)] as u8;
            }
            2 => {
                // A 2-, 4- or 8-byte field set to an extreme, either byte order.
                let w = [2, 4, 8][rng.below(3)];
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let b = if rng.below(2) == 0 {
                    x.to_le_bytes()
                } else {
                    x.to_be_bytes()
                };
                let i = pos(rng, len);
                for k in 0..w.min(len - i) {
                    v[i + k] = if b[0] == 0 { b[8 - w + k] } else { b[k] };
                }
            }
            3 => v.truncate(rng.below(len)),
            4 => {
                let i = pos(rng, len);
                let n = (1 + rng.below(64)).min(len - i);
                v.drain(i..i + n);
            }
            5 => {
                let i = pos(rng, len);
                let bytes: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            6 => {
                let i = rng.below(len);
                let n = (1 + rng.below(256)).min(len - i);
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(len);
                v.splice(at..at, chunk);
            }
            7 if !other.is_empty() => {
                let i = rng.below(len);
                let j = rng.below(other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            8 => {
                let i = pos(rng, len);
                let n = (1 + rng.below(16)).min(len - i);
                for b in &mut v[i..i + n] {
                    *b = rng.next() as u8;
                }
            }
            _ => {
                // A decimal number in text (JSON, headers, TSV) replaced by an extreme one.
                let starts: Vec<usize> = (0..len)
                    .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
                    .collect();
                if starts.is_empty() {
                    continue;
                }
                let s = starts[rng.below(starts.len())];
                let e = (s..len).find(|&i| !v[i].is_ascii_digit()).unwrap_or(len);
                let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes().to_vec();
                v.splice(s..e, n);
            }
        }
    }
    v
}

/// Systematic edits of a seed, besides the random ones: each 4- and 8-byte field of the first 32
/// bytes set to an extreme (either byte order), and each decimal number of the first 4 KiB (JSON,
/// npy headers, TSV) replaced by each extreme number. These reach the length and count fields
/// that random edits rarely hit exactly.
fn sweeps(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for at in 0..seed.len().min(32) {
        for w in [4usize, 8] {
            for x in [0xffff_ffffu64, u64::MAX] {
                for le in [true, false] {
                    let b = if le { x.to_le_bytes() } else { x.to_be_bytes() };
                    let b = if le { &b[..w] } else { &b[8 - w..] };
                    let mut v = seed.to_vec();
                    let n = w.min(v.len() - at);
                    v[at..at + n].copy_from_slice(&b[..n]);
                    out.push(v);
                }
            }
        }
    }
    let head = &seed[..seed.len().min(4096)];
    let starts: Vec<usize> = (0..head.len())
        .filter(|&i| head[i].is_ascii_digit() && (i == 0 || !head[i - 1].is_ascii_digit()))
        .take(64)
        .collect();
    for s in starts {
        let e = (s..seed.len())
            .find(|&i| !seed[i].is_ascii_digit())
            .unwrap_or(seed.len());
        for n in NUMBERS {
            let mut v = seed.to_vec();
            v.splice(s..e, n.bytes());
            out.push(v);
        }
    }
    out
}

// ---- the harness ----

/// One reader's tally.
#[derive(Default)]
struct Tally {
    inputs: usize,
    accepted: usize,
    errors: usize,
    panics: usize,
    unclear: usize,
    slowest_ms: u128,
    peak_mib: f64,
}

static SERIAL: Mutex<()> = Mutex::new(());
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Milliseconds since START when the current input began (0: none running).
static RUNNING_SINCE: AtomicU64 = AtomicU64::new(0);
static CURRENT: Mutex<String> = Mutex::new(String::new());
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
const HANG: Duration = Duration::from_secs(20);

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        START.get_or_init(Instant::now);
        std::panic::set_hook(Box::new(|info| {
            if RUNNING_SINCE.load(Ordering::Relaxed) == 0 {
                // Not a reader's panic: the test's own assertion.
                eprintln!("{info}");
                return;
            }
            let mut p = PANICS.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() < 20 {
                p.push(format!("{info}"));
            }
        }));
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let since = RUNNING_SINCE.load(Ordering::Relaxed);
                let now = START.get().unwrap().elapsed().as_millis() as u64;
                if since != 0 && now.saturating_sub(since) > HANG.as_millis() as u64 {
                    let what = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("HANG: {what} ran over {HANG:?}; aborting");
                    std::process::abort();
                }
            }
        });
    });
}

fn scale() -> usize {
    std::env::var("DEEPRANK_HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn base_seed() -> u64 {
    std::env::var("DEEPRANK_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

/// Feeds `n` mutations of `seeds` to `read` (Ok: accepted; Err: the error's message). An error
/// is clear when `clear` says so; memory is bounded by `mem_bound` bytes over the baseline.
fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    n: usize,
    mem_bound: usize,
    mut read: impl FnMut(&[u8]) -> Result<(), String>,
    clear: impl Fn(&str) -> bool,
) -> Tally {
    setup();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng(base_seed()
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64));
    let mut t = Tally::default();
    let mut unclear_examples = Vec::new();
    // The seeds themselves first (they must be read), then the sweeps, then random mutations.
    let swept = sweeps(&seeds[0]);
    for i in 0..seeds.len() + swept.len() + n {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else if i < seeds.len() + swept.len() {
            swept[i - seeds.len()].clone()
        } else {
            let s = &seeds[rng.below(seeds.len())];
            let o = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, s, o)
        };
        *CURRENT.lock().unwrap() = format!("{name} input {i} (seed {})", base_seed());
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t0 = Instant::now();
        RUNNING_SINCE.store(
            START.get().unwrap().elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        let r = catch_unwind(AssertUnwindSafe(|| read(&input)));
        RUNNING_SINCE.store(0, Ordering::Relaxed);
        t.slowest_ms = t.slowest_ms.max(t0.elapsed().as_millis());
        let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        t.peak_mib = t.peak_mib.max(grown as f64 / (1 << 20) as f64);
        assert!(
            grown <= mem_bound,
            "{name} input {i}: {grown} bytes allocated, over the {mem_bound}-byte bound"
        );
        if i < seeds.len() {
            assert!(
                matches!(r, Ok(Ok(()))),
                "{name}: seed {i} was not read: {r:?}"
            );
        }
        t.inputs += 1;
        match r {
            Ok(Ok(())) => t.accepted += 1,
            Ok(Err(msg)) => {
                t.errors += 1;
                if !clear(&msg) {
                    t.unclear += 1;
                    if unclear_examples.len() < 5 {
                        unclear_examples.push(msg);
                    }
                }
            }
            Err(_) => t.panics += 1,
        }
    }
    println!(
        "| {name} | {} | {} | {} | {} | {} | {} | {:.1} |",
        t.inputs, t.accepted, t.errors, t.panics, t.unclear, t.slowest_ms, t.peak_mib
    );
    let panics = PANICS.lock().unwrap().clone();
    assert_eq!(t.panics, 0, "{name}: {} panics, e.g. {panics:#?}", t.panics);
    assert_eq!(
        t.unclear, 0,
        "{name}: unclear errors, e.g. {unclear_examples:#?}"
    );
    t
}

// ---- images ----

fn encode(img: &image::RgbImage, f: image::ImageFormat) -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    img.write_to(&mut c, f).unwrap();
    c.into_inner()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join("hostile").join(name)).unwrap()
}

fn image_seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    use image::ImageFormat as F;
    let photo = std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap();
    let img = transform_small(&photo);
    let gray = image::DynamicImage::ImageRgb8(img.clone()).to_luma8();
    let mut gray_png = Cursor::new(Vec::new());
    gray.write_to(&mut gray_png, F::Png).unwrap();
    vec![
        ("jpeg", vec![photo, encode(&img, F::Jpeg)]),
        ("png", vec![encode(&img, F::Png), gray_png.into_inner()]),
        (
            "webp",
            vec![
                encode(&img, F::WebP),
                fixture("lossy.webp"),
                fixture("animated.webp"),
            ],
        ),
        ("gif", vec![encode(&img, F::Gif)]),
        ("bmp", vec![encode(&img, F::Bmp)]),
        ("tiff", vec![encode(&img, F::Tiff)]),
    ]
}

fn transform_small(jpeg: &[u8]) -> image::RgbImage {
    let img = deeprank::data::transform::decode_rgb(jpeg, 1 << 20).unwrap();
    image::imageops::resize(&img, 24, 20, image::imageops::FilterType::Triangle)
}

#[test]
fn mutated_images_get_clear_errors() {
    use deeprank::data::transform::{self, ImageError};
    const MAX_PIXELS: u64 = 4 << 20;
    let mut total = Tally::default();
    for (name, seeds) in image_seeds() {
        let t = fuzz(
            name,
            &seeds,
            250 * scale(),
            // The decoder's buffer (≤ 8 bytes a pixel), the RGB copy and the upright turn.
            (MAX_PIXELS as usize) * 14 + (64 << 20),
            |b| {
                let img = transform::decode_rgb(b, MAX_PIXELS).map_err(|e| {
                    let clear = matches!(
                        e,
                        ImageError::Empty
                            | ImageError::Unsupported(_)
                            | ImageError::TooManyPixels { .. }
                            | ImageError::Decode(_)
                    );
                    if clear {
                        e.to_string()
                    } else {
                        format!("UNEXPECTED {e:?}")
                    }
                })?;
                // Whatever decodes goes through the rest of the input transform.
                let img = transform::resize_rgb(&img, 32).map_err(|e| e.to_string())?;
                let mut out = vec![0f32; 3 * 32 * 32];
                transform::normalise_chw(&img, &mut out).map_err(|e| e.to_string())
            },
            |m| !m.starts_with("UNEXPECTED") && !m.is_empty(),
        );
        total.inputs += t.inputs;
    }
    assert!(total.inputs >= 1500 * scale());
}

// ---- weights ----

fn safetensors_seed() -> Vec<u8> {
    let stem = 32 * 3 * 3 * 3 * 4;
    let header = format!(
        "{{\"_conv_stem.weight\":{{\"dtype\":\"F32\",\"shape\":[32,3,3,3],\"data_offsets\":[0,{stem}]}},\"_bn0.weight\":{{\"dtype\":\"F32\",\"shape\":[32],\"data_offsets\":[{stem},{}]}}}}",
        stem + 128
    );
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    for i in 0..(stem + 128) / 4 {
        v.extend_from_slice(&((i % 13) as f32 / 13.0).to_le_bytes());
    }
    v
}

/// Rebuilds a zip-format `.pth` with its pickle replaced (a valid archive around a hostile pickle).
fn rezip_pth(pth: &[u8], pickle: &[u8]) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(Cursor::new(pth)).unwrap();
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        out.start_file(name.as_str(), opts).unwrap();
        out.write_all(if name.ends_with("data.pkl") {
            pickle
        } else {
            &data
        })
        .unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn pickle_of(pth: &[u8]) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(Cursor::new(pth)).unwrap();
    let mut f = zin.by_name("archive/data.pkl").unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Weights as `weights::load` reads them; our tiny seeds hold 2 of Lite0's tensors, so a seed is
/// "read" when the error says which tensors are missing.
fn load_weights(dir: &Path, ext: &str, bytes: &[u8]) -> Result<(), String> {
    let p = dir.join(format!("w.{ext}"));
    std::fs::write(&p, bytes).unwrap();
    match deeprank::model::weights::load(
        &p,
        deeprank::model::lite::Backbone::Lite0,
        &deeprank::model::device::device(),
    ) {
        Ok(_) => Ok(()),
        Err(e) => {
            let m = format!("{e:#}");
            if m.contains("lack") && m.contains("EfficientNet-Lite0 tensors") {
                Ok(())
            } else {
                Err(m)
            }
        }
    }
}

#[test]
fn mutated_weights_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let names_file = |m: &str| m.contains("w.safetensors") || m.contains("w.pth");
    fuzz(
        "safetensors",
        &[safetensors_seed()],
        150 * scale(),
        256 << 20,
        |b| load_weights(&d, "safetensors", b),
        names_file,
    );
    let pth = fixture("tiny.pth");
    let pickle = pickle_of(&pth);
    fuzz(
        "pth (file)",
        std::slice::from_ref(&pth),
        100 * scale(),
        256 << 20,
        |b| load_weights(&d, "pth", b),
        names_file,
    );
    // The pickle itself mutated inside a valid archive (the zip's checksums would otherwise
    // refuse most mutations before the pickle is read).
    fuzz(
        "pth (pickle)",
        &[pickle],
        100 * scale(),
        256 << 20,
        |p| load_weights(&d, "pth", &rezip_pth(&pth, p)),
        names_file,
    );
}

// ---- the DB ----

fn db_seed(dir: &Path) -> [Vec<u8>; 5] {
    use deeprank::store::db::{DbWriter, Entry, Meta};
    let db = dir.join("seed-db");
    let mut w = DbWriter::create(&db, 8, None).unwrap();
    for i in 0..6 {
        let e = Entry {
            path: format!("data/c{}/img {i}.jpg", i % 2).into(),
            class_id: format!("c{}", i % 2),
            class_name: format!("class {}", i % 2),
        };
        let v: Vec<f32> = (0..8).map(|k| ((i * 8 + k) as f32).sin()).collect();
        w.push(&e, &v).unwrap();
    }
    w.finish(Meta {
        model: "efficientnet-lite0-imagenet:57934424:pooled".into(),
        model_source: "pretrained".into(),
        size: 64,
        dim: 8,
        count: 0,
        normalized: true,
        data: "data".into(),
        deeprank_version: "test".into(),
        format: 2,
    })
    .unwrap();
    DB_FILES.map(|f| std::fs::read(db.join(f)).unwrap())
}

/// The files of a DB (format 2: the commit record and the tombstones too).
const DB_FILES: [&str; 5] = [
    "vectors.npy",
    "manifest.tsv",
    "meta.json",
    "state.json",
    "removed.tsv",
];

#[test]
fn mutated_db_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = db_seed(dir.path());
    let db = dir.path().join("db");
    std::fs::create_dir_all(&db).unwrap();
    for (k, file) in DB_FILES.iter().enumerate() {
        fuzz(
            file,
            &[seed[k].clone()],
            300 * scale(),
            64 << 20,
            |b| {
                for (j, f) in DB_FILES.iter().enumerate() {
                    std::fs::write(db.join(f), if j == k { b } else { &seed[j] }).unwrap();
                }
                let d = deeprank::store::db::Db::open(&db).map_err(|e| format!("{e:#}"))?;
                // Whatever opens can be searched.
                let q = d.vectors.row(0).to_vec();
                let rows = deeprank::search::query::rank(&d, &q, &[None], 3);
                if rows.len() != 1 {
                    return Err("rank gave no rows".into());
                }
                Ok(())
            },
            |m| m.contains(&db.display().to_string()),
        );
    }
}

// ---- checkpoints ----

#[test]
fn mutated_checkpoints_get_clear_errors() {
    use burn::module::Module;
    use deeprank::train::checkpoint::{self, Accum, TrainState};
    use deeprank::train::config::{Recipe, TrainConfig};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("checkpoint.bin");
    let state = TrainState {
        config: TrainConfig::recipe(Recipe::Default, "data".into()),
        epoch: 2,
        step_in_epoch: 7,
        global_step: 31,
        lr_scale: 0.1,
        best: Some(0.5),
        bad_epochs: 1,
        history: vec![],
        accum: Accum::default(),
        train_seconds: 12.5,
        wall_seconds: 13.0,
        skipped_images: vec!["x.jpg".into()],
    };
    let dev = deeprank::model::device::device();
    let head = burn::nn::LinearConfig::new(8, 4).init(&dev);
    let record = head.clone().into_record().into_bytes().unwrap().to_vec();
    let parts = checkpoint::Parts {
        state_json: serde_json::to_vec(&state).unwrap(),
        model: record.clone(),
        optimizer: vec![],
    };
    checkpoint::write(&p, &parts).unwrap();
    let file = std::fs::read(&p).unwrap();
    let named = |m: &str| m.contains("checkpoint.bin");
    fuzz(
        "checkpoint.bin",
        &[file],
        300 * scale(),
        64 << 20,
        |b| {
            std::fs::write(&p, b).unwrap();
            let parts = checkpoint::read(&p).map_err(|e| format!("{e:#}"))?;
            serde_json::from_slice::<TrainState>(&parts.state_json)
                .map_err(|e| format!("{} is damaged: {e}", p.display()))?;
            Ok(())
        },
        named,
    );
    // The model record inside (burn's burnpack), as resume decodes it.
    fuzz(
        "checkpoint model record",
        &[record],
        300 * scale(),
        64 << 20,
        |b| {
            let rec = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(
                b.to_vec(),
            ))
            .map_err(|e| format!("checkpoint model: {e:?}"))?;
            head.clone()
                .try_load_record(rec)
                .map_err(|e| format!("checkpoint model: {e:?}"))?;
            Ok(())
        },
        |m| m.starts_with("checkpoint model: "),
    );
}

// ---- multipart upload bodies ----

#[test]
fn mutated_multipart_bodies_get_clear_errors() {
    use axum::body::Body;
    use axum::http::Request;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let jpg = std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap();
    let b = "deeprank-fuzz";
    let body = |file: &[u8]| {
        let mut v = format!("--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").into_bytes();
        v.extend_from_slice(file);
        v.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
        v
    };
    let seeds = [body(&jpg), body(b"tiny")];
    fuzz(
        "multipart",
        &seeds,
        500 * scale(),
        64 << 20,
        |bytes| {
            let req = Request::post("/api/search")
                .header("content-type", format!("multipart/form-data; boundary={b}"))
                .body(Body::from(bytes.to_vec()))
                .unwrap();
            let got = rt.block_on(deeprank::serve::upload_bytes(req, 1 << 20));
            match got {
                Ok((file, _name)) => {
                    // What came out goes to the decoder as the handler sends it.
                    let _ = deeprank::data::transform::decode_rgb(&file, 4 << 20);
                    Ok(())
                }
                Err(r) => {
                    let status = r.status().as_u16();
                    let body = rt
                        .block_on(axum::body::to_bytes(r.into_body(), 1 << 16))
                        .map_err(|e| e.to_string())?;
                    let v: serde_json::Value =
                        serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                    Err(format!("{status} {}", v["error"].as_str().unwrap_or("")))
                }
            }
        },
        |m| (m.starts_with("400 ") || m.starts_with("413 ")) && m.len() > 8,
    );
}
