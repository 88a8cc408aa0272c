//! Result pictures like the seed's figures: the query, then its top N as thumbnails with rank,
//! distance and class under each, framed green (same class as the query), red (different) or grey
//! (unknown). Drawn from plain rows, so it knows nothing of search.

use crate::data::transform;
use crate::render::font::draw_text;
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

const TILE: u32 = 128;
const PAD: u32 = 8;
const BORDER: u32 = 4;
const CAPTION: u32 = 24;
const COLS: u32 = 5;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const SAME: Rgb<u8> = Rgb([30, 160, 60]);
const DIFF: Rgb<u8> = Rgb([210, 40, 40]);
const UNKNOWN: Rgb<u8> = Rgb([150, 150, 150]);
const QUERY: Rgb<u8> = Rgb([40, 90, 220]);

fn fit(s: &str, chars: usize) -> String {
    if s.chars().count() <= chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(chars.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

fn tile(img: &mut RgbImage, x: u32, y: u32, path: &Path, frame: Rgb<u8>, lines: [&str; 2]) {
    let inner = TILE - 2 * BORDER;
    for dy in 0..TILE {
        for dx in 0..TILE {
            img.put_pixel(x + dx, y + dy, frame);
        }
    }
    let thumb = transform::load_rgb(path)
        .ok()
        .and_then(|i| transform::resize_rgb(&i, inner).ok());
    match thumb {
        Some(t) => image::imageops::replace(img, &t, (x + BORDER) as i64, (y + BORDER) as i64),
        None => draw_text(img, x + BORDER + 4, y + TILE / 2, "unreadable", BG),
    }
    let chars = (TILE / 8) as usize;
    draw_text(img, x, y + TILE + 3, &fit(lines[0], chars), INK);
    draw_text(img, x, y + TILE + 13, &fit(lines[1], chars), INK);
}

/// Whether a result shares the query's class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Same,
    Different,
    Unknown,
}

/// One result tile: the image, its rank and distance, and the caption under it (its class).
#[derive(Clone, Debug)]
pub struct GridRow {
    pub path: PathBuf,
    pub rank: usize,
    pub distance: f32,
    pub caption: String,
    pub mark: Mark,
}

/// The query tile (its image and a caption: its class, or that it is unknown) and the result rows.
#[derive(Clone, Debug)]
pub struct Grid {
    pub query: PathBuf,
    pub caption: String,
    pub rows: Vec<GridRow>,
    /// The two headings (over the query, over the rows); `None`: "query", "top N by Euclidean distance".
    pub headings: Option<(String, String)>,
}

/// Renders one query and its results to an image.
pub fn render(q: &Grid) -> RgbImage {
    let cell_w = TILE + PAD;
    let cell_h = TILE + CAPTION + PAD;
    let rows = (q.rows.len() as u32).div_ceil(COLS).max(1);
    let width = PAD + cell_w * (COLS + 1) + PAD;
    let height = PAD + 12 + cell_h * rows;
    let mut img = RgbImage::from_pixel(width, height, BG);
    let (left, right) = q.headings.clone().unwrap_or_else(|| {
        (
            "query".into(),
            format!("top {} by Euclidean distance", q.rows.len()),
        )
    });
    draw_text(&mut img, PAD, PAD, &left, INK);
    draw_text(&mut img, PAD + cell_w + PAD, PAD, &right, INK);
    let y0 = PAD + 12;
    let qfile = q
        .query
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    tile(&mut img, PAD, y0, &q.query, QUERY, [&qfile, &q.caption]);
    for (i, r) in q.rows.iter().enumerate() {
        let (col, row) = (i as u32 % COLS, i as u32 / COLS);
        let x = PAD + cell_w * (col + 1) + PAD;
        let y = y0 + cell_h * row;
        let frame = match r.mark {
            Mark::Same => SAME,
            Mark::Different => DIFF,
            Mark::Unknown => UNKNOWN,
        };
        let mark = match r.mark {
            Mark::Same => "+",
            Mark::Different => "x",
            Mark::Unknown => "",
        };
        let l1 = format!("#{} d={:.3}{}", r.rank, r.distance, mark);
        tile(&mut img, x, y, &r.path, frame, [&l1, &r.caption]);
    }
    img
}

/// Writes the picture of one query to `out` (PNG).
pub fn write(q: &Grid, out: &Path) -> Result<()> {
    if let Some(p) = out.parent()
        && !p.as_os_str().is_empty()
    {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    render(q)
        .save_with_format(out, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", out.display()))
}
