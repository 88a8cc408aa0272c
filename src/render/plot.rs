//! `plot.png`: training loss and validation P@30 against epochs, like the seed's loss figure.
//! Drawn with the bitmap font of the result grids, so it needs no system fonts.

use crate::render::font::draw_text;
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 420;
const H: u32 = 300;
const M: u32 = 44;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

/// One panel: a series against epochs 1..=n, at horizontal offset `ox`.
fn panel(img: &mut RgbImage, ox: u32, title: &str, ys: &[Option<f64>], color: Rgb<u8>) {
    let ink = Rgb([30, 30, 30]);
    let grey = Rgb([200, 200, 200]);
    let (x0, y0, x1, y1) = (ox + M, 24, ox + W - 12, H - 30);
    draw_text(img, ox + M, 6, title, ink);
    let vals: Vec<f64> = ys
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if vals.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.08;
    let (lo, hi) = (lo - pad, hi + pad);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let y = y1 as f64 - (y1 - y0) as f64 * k as f64 / 4.0;
        line(img, (x0 as f64, y), (x1 as f64, y), grey);
        draw_text(img, ox + 2, y as u32 - 4, &format!("{v:.3}"), ink);
    }
    line(img, (x0 as f64, y0 as f64), (x0 as f64, y1 as f64), ink);
    line(img, (x0 as f64, y1 as f64), (x1 as f64, y1 as f64), ink);
    let n = ys.len().max(1);
    let xat = |i: usize| {
        if n == 1 {
            (x0 + x1) as f64 / 2.0
        } else {
            x0 as f64 + (x1 - x0) as f64 * i as f64 / (n - 1) as f64
        }
    };
    let yat = |v: f64| y1 as f64 - (y1 - y0) as f64 * (v - lo) / (hi - lo);
    let mut prev: Option<(f64, f64)> = None;
    for (i, v) in ys.iter().enumerate() {
        match v {
            Some(v) if v.is_finite() => {
                let p = (xat(i), yat(*v));
                if let Some(q) = prev {
                    line(img, q, p, color);
                }
                for dx in -2..=2 {
                    for dy in -2..=2 {
                        let (px, py) = ((p.0 as i64 + dx) as u32, (p.1 as i64 + dy) as u32);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, color);
                        }
                    }
                }
                prev = Some(p);
            }
            _ => prev = None,
        }
    }
    draw_text(img, x0, H - 20, "epoch 1", ink);
    let last = format!("epoch {n}");
    draw_text(
        img,
        x1.saturating_sub(8 * last.len() as u32),
        H - 20,
        &last,
        ink,
    );
}

/// Writes the two-panel plot.
pub fn write(path: &Path, loss: &[f64], p30: &[Option<f64>]) -> Result<()> {
    let mut img = RgbImage::from_pixel(2 * W, H, Rgb([255, 255, 255]));
    let loss: Vec<Option<f64>> = loss.iter().map(|&v| Some(v)).collect();
    panel(
        &mut img,
        0,
        "training loss (mean per epoch)",
        &loss,
        Rgb([210, 60, 40]),
    );
    panel(&mut img, W, "validation P@30", p30, Rgb([40, 90, 220]));
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
