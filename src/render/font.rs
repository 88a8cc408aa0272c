//! Text in pictures without system fonts: the 8×8 bitmap font.

use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};

/// Draws ASCII text with the 8×8 bitmap font; characters outside ASCII print as '?'.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, color: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let c = if ch.is_ascii() {
            ch as usize
        } else {
            b'?' as usize
        };
        let glyph = BASIC_LEGACY[c];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    let (px, py) = (x + i as u32 * 8 + col, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, color);
                    }
                }
            }
        }
    }
}
