//! Real-world images (issue 12, items 2–4): EXIF orientation, WebP / GIF / BMP / TIFF with the
//! pixel-limit and truncation guards, "unsupported format" for the rest, and file names that are
//! not UTF-8 from `embed` through `manifest.tsv` to `serve`'s `GET /api/images/{id}`.

mod common;

use deeprank::data::transform::{self, ImageError};
use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// A 64×48 picture with no symmetry: every pixel differs from its mirror images.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            ((x * 7 + y * 3) % 256) as u8,
        ])
    })
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Inserts an EXIF APP1 segment holding only the orientation tag right after a JPEG's SOI.
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes()); // first IFD
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // count
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_turns_jpegs_upright() {
    let jpeg = encode(&picture(64, 48), ImageFormat::Jpeg);
    let plain = transform::decode_rgb(&jpeg, 1 << 20).unwrap();
    let (w, h) = plain.dimensions();
    let at = |x: u32, y: u32| *plain.get_pixel(x, y);
    // Orientation 1 (or none) changes nothing.
    assert_eq!(
        transform::decode_rgb(&with_orientation(&jpeg, 1), 1 << 20).unwrap(),
        plain
    );
    // 3: turned 180°; 6: the camera was turned, show it rotated 90° clockwise; 8: 90° counter-clockwise.
    type Map = fn(u32, u32, u32, u32) -> (u32, u32);
    let cases: [(u16, (u32, u32), Map); 3] = [
        (3, (w, h), |x, y, w, h| (w - 1 - x, h - 1 - y)),
        (6, (h, w), |x, y, _w, h| (y, h - 1 - x)),
        (8, (h, w), |x, y, w, _h| (w - 1 - y, x)),
    ];
    for (o, dims, src) in cases {
        let img = transform::decode_rgb(&with_orientation(&jpeg, o), 1 << 20).unwrap();
        assert_eq!(img.dimensions(), dims, "orientation {o}");
        for (x, y, p) in img.enumerate_pixels() {
            let (sx, sy) = src(x, y, w, h);
            assert_eq!(*p, at(sx, sy), "orientation {o} at ({x}, {y})");
        }
    }
}

#[test]
fn exif_orientation_reaches_the_embeddings() {
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data/photos");
    std::fs::create_dir_all(&data).unwrap();
    let src = image::open(common::sample().join("val/images/val_68.JPEG"))
        .unwrap()
        .to_rgb8();
    let jpeg = encode(&src, ImageFormat::Jpeg);
    let decoded = transform::decode_rgb(&jpeg, 1 << 20).unwrap();
    std::fs::write(data.join("plain.jpg"), &jpeg).unwrap();
    // The same picture as a phone stores it (pixels as shot, tag 6) and as an editor would save
    // it upright (pixels rotated, no tag).
    let phone = data.join("phone.jpg");
    std::fs::write(&phone, with_orientation(&jpeg, 6)).unwrap();
    std::fs::write(
        data.join("upright.png"),
        encode(&image::imageops::rotate90(&decoded), ImageFormat::Png),
    )
    .unwrap();
    let db = dir.path().join("db");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--out",
        db.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = common::cli(&[
        "query",
        "--db",
        db.to_str().unwrap(),
        "--image",
        phone.to_str().unwrap(),
        "--top",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v[0]["results"].as_array().unwrap();
    let dist = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} not in {v}"))["distance"]
            .as_f64()
            .unwrap()
    };
    assert!(dist("upright.png") < 1e-4, "{v}");
    assert!(dist("plain.jpg") > 1e-2, "{v}");
}

/// Each format deeprank decodes, made from one picture (GIF and lossy WebP are not lossless).
fn formats() -> Vec<(&'static str, Vec<u8>, bool)> {
    let img = picture(64, 48);
    vec![
        ("png", encode(&img, ImageFormat::Png), true),
        ("webp", encode(&img, ImageFormat::WebP), true),
        ("bmp", encode(&img, ImageFormat::Bmp), true),
        ("tiff", encode(&img, ImageFormat::Tiff), true),
        ("gif", encode(&img, ImageFormat::Gif), false),
    ]
}

#[test]
fn webp_gif_bmp_tiff_decode_like_png() {
    let img = picture(64, 48);
    for (name, bytes, exact) in formats() {
        let got = transform::decode_rgb(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dimensions(), (64, 48), "{name}");
        let worst = got
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= if exact { 0 } else { 40 },
            "{name}: off by {worst}"
        );
    }
    let hostile = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile");
    let lossy = transform::decode_rgb(&std::fs::read(hostile.join("lossy.webp")).unwrap(), 1 << 20);
    assert_eq!(lossy.unwrap().dimensions(), (48, 40));
}

#[test]
fn animated_gif_and_webp_give_their_first_frame() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, Rgba, RgbaImage};
    let red = RgbaImage::from_pixel(16, 12, Rgba([255, 0, 0, 255]));
    let blue = RgbaImage::from_pixel(16, 12, Rgba([0, 0, 255, 255]));
    let mut gif = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut gif);
        for f in [red, blue] {
            enc.encode_frame(Frame::from_parts(
                f,
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            ))
            .unwrap();
        }
    }
    let img = transform::decode_rgb(&gif, 1 << 20).unwrap();
    assert_eq!(img.dimensions(), (16, 12));
    assert!(
        img.pixels().all(|p| p.0 == [255, 0, 0]),
        "not the first frame"
    );
    // A two-frame WebP (the first frame as it is, the second mirrored; see make_hostile_seeds.py).
    let hostile = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile");
    let anim = transform::decode_rgb(
        &std::fs::read(hostile.join("animated.webp")).unwrap(),
        1 << 20,
    )
    .unwrap();
    let first = transform::decode_rgb(&std::fs::read(hostile.join("lossy.webp")).unwrap(), 1 << 20)
        .unwrap();
    assert_eq!(anim.dimensions(), first.dimensions());
    let diff = |a: &RgbImage, b: &RgbImage| {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y) as u64)
            .sum::<u64>() as f64
            / a.as_raw().len() as f64
    };
    let mirrored = image::imageops::flip_horizontal(&first);
    assert!(
        diff(&anim, &first) < diff(&anim, &mirrored),
        "the animated WebP did not give its first frame"
    );
}

#[test]
fn every_format_keeps_the_pixel_limit_and_refuses_truncation() {
    for (name, bytes, _) in formats() {
        // 64×48 = 3072 pixels: over a 3000-pixel limit, refused from the header.
        match transform::decode_rgb(&bytes, 3000) {
            Err(ImageError::TooManyPixels { w: 64, h: 48, .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
        // Cut anywhere past the header, the file is refused, never padded with grey.
        for keep in [bytes.len() / 2, bytes.len() * 3 / 4, bytes.len() - 8] {
            match transform::decode_rgb(&bytes[..keep], 1 << 20) {
                Err(ImageError::Decode(_)) => {}
                other => panic!("{name} cut to {keep} of {} bytes: {other:?}", bytes.len()),
            }
        }
    }
}

#[test]
fn other_formats_are_named_unsupported() {
    let cases: [(&str, &[u8]); 4] = [
        (
            "PNM",
            b"P6\n4 4\n255\n............................................",
        ),
        ("QOI", b"qoif\0\0\0\x04\0\0\0\x04\x03\0........"),
        ("ICO", b"\0\0\x01\0\x01\0\x10\x10\0\0\x01\0 \0......"),
        ("recognises", b"hello, this is a text file"),
    ];
    for (what, bytes) in cases {
        let e = transform::decode_rgb(bytes, 1 << 20).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Unsupported(_)), "{what}: {e:?}");
        assert!(msg.starts_with("unsupported format"), "{msg}");
        assert!(msg.contains(what), "{msg}");
        assert!(
            msg.contains("WebP, GIF (first frame), BMP or TIFF"),
            "{msg}"
        );
    }
}

#[test]
fn embed_reads_every_format_and_names_what_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let cls = dir.path().join("data/things");
    std::fs::create_dir_all(&cls).unwrap();
    for (name, bytes, _) in formats() {
        std::fs::write(cls.join(format!("a.{name}")), bytes).unwrap();
    }
    std::fs::write(
        cls.join("b.TIF"),
        encode(&picture(32, 32), ImageFormat::Tiff),
    )
    .unwrap();
    std::fs::write(cls.join("fake.webp"), b"not really a webp").unwrap();
    let ds = deeprank::data::dataset::Dataset::open(
        &dir.path().join("data"),
        deeprank::data::dataset::Split::Train,
    )
    .unwrap();
    assert_eq!(ds.items.len(), 7, "{:?}", ds.ignored);
    let mut ok = 0;
    for it in &ds.items {
        let name = it.path.file_name().unwrap().to_string_lossy().to_string();
        match transform::load_rgb(&it.path) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(name, "fake.webp");
                assert!(e.to_string().starts_with("unsupported format"), "{e}");
            }
        }
    }
    assert_eq!(ok, 6);
}

// ---- item 4: file names that are not UTF-8 ----

#[cfg(unix)]
fn non_utf8_name() -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // Latin-1 "café", a tab and a backslash: none survives a lossy or tab-separated manifest.
    PathBuf::from(std::ffi::OsStr::from_bytes(b"caf\xe9\tno\\te.jpg"))
}

#[cfg(unix)]
#[test]
fn manifest_paths_round_trip_losslessly() {
    use deeprank::store::db::{escape_path, unescape_path};
    let cases = [
        non_utf8_name(),
        PathBuf::from("plain/ascii.jpg"),
        PathBuf::from("ünïcode/画像.png"),
        PathBuf::from("back\\slash\\x41\\t/new\nline\r.jpg"),
    ];
    for p in cases {
        let e = escape_path(&p);
        assert!(!e.contains(['\t', '\n', '\r']), "{e:?}");
        assert_eq!(unescape_path(&e), p, "{e:?}");
    }
    assert_eq!(escape_path(&non_utf8_name()), "caf\\xE9\\tno\\\\te.jpg");
    // Manifests written before escaping: a backslash that starts no escape stays as it is.
    assert_eq!(unescape_path("a\\b\\xZ1"), PathBuf::from("a\\b\\xZ1"));
}

#[cfg(unix)]
#[test]
fn non_utf8_file_names_are_embedded_and_served() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    common::weights();
    let dir = tempfile::tempdir().unwrap();
    let cls = dir.path().join("data/cafes");
    std::fs::create_dir_all(&cls).unwrap();
    let jpg = std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap();
    let odd = cls.join(non_utf8_name());
    std::fs::write(&odd, &jpg).unwrap();
    std::fs::write(cls.join("plain.jpg"), &jpg).unwrap();
    let db = dir.path().join("db");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--out",
        db.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    let manifest = std::fs::read(db.join("manifest.tsv")).unwrap();
    let text = String::from_utf8(manifest).expect("the manifest is UTF-8 text");
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("caf\\xE9\\tno\\\\te.jpg\t"), "{text}");
    let opened = deeprank::store::db::Db::open(&db).unwrap();
    let id = opened
        .entries
        .iter()
        .position(|e| e.path == odd)
        .unwrap_or_else(|| panic!("{odd:?} not in {:?}", opened.entries));

    let mut child = Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .args([
            "--threads",
            "2",
            "serve",
            "--db",
            db.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Kill(child);
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(format!("{base}/api/images/{id}")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.body_mut().read_to_vec().unwrap(), jpg);
    // "More like this" from that image answers too.
    let mut r = agent
        .get(format!("{base}/api/search?id={id}&top=1"))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["results"][0]["distance"].as_f64().unwrap(), 0.0, "{v}");

    // The CLI takes the name as a query and its JSON names the file in the manifest's escaped
    // form instead of failing.
    let out = Command::new(env!("CARGO_BIN_EXE_deeprank"))
        .args([
            "query",
            "--db",
            db.to_str().unwrap(),
            "--top",
            "2",
            "--json",
            "--image",
        ])
        .arg(&odd)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let escaped = format!("{}", cls.join("caf\\xE9\\tno\\\\te.jpg").display());
    assert_eq!(v[0]["image"].as_str().unwrap(), escaped, "{v}");
    assert!(
        v[0]["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == escaped.as_str()),
        "{v}"
    );
}

/// A batch decoded into a reused buffer full of stale values (`decode_batch_into`, what `embed`'s
/// stream does from its second batch on) equals each image loaded on its own, with a broken file
/// in the middle left out and the images after it moved up over its slot.
#[test]
fn batch_decoded_into_a_reused_buffer_is_each_image_in_order() {
    use deeprank::data::batch::{decode_batch, decode_batch_into};
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..5u32 {
        let p = dir.path().join(format!("{i}.png"));
        if i == 2 {
            std::fs::write(&p, b"not a png").unwrap();
        } else {
            picture(40 + 8 * i, 48).save(&p).unwrap();
        }
        paths.push(p);
    }
    let size = 32u32;
    let per = 3 * 32 * 32;
    let want: Vec<f32> = paths
        .iter()
        .filter_map(|p| {
            let mut v = vec![0f32; per];
            transform::load_tensor(p, size, &mut v).ok().map(|_| v)
        })
        .flatten()
        .collect();
    assert_eq!(want.len(), 4 * per);
    for stale in [Vec::new(), vec![f32::NAN; 7 * per], vec![9.0; 2 * per + 5]] {
        let (buf, ok, skipped) = decode_batch_into(&paths, size, stale);
        assert_eq!(ok, [true, true, false, true, true]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].path, paths[2]);
        assert_eq!(buf.len(), want.len());
        assert!(
            buf.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
    assert_eq!(decode_batch(&paths, size).0, want);
}
