//! Image decoding and the model's input transform: decode (JPEG, PNG, WebP, GIF, BMP, TIFF; guarded
//! against decompression bombs and truncation), turn upright by the EXIF orientation, convert to
//! RGB, bilinear resize to `size`×`size`, normalise `(x/255 − 0.498)/0.502`, CHW f32.

use anyhow::{Result, anyhow, bail};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// EfficientNet-Lite's input normalisation (the weights were trained with it).
pub const MEAN: f32 = 0.498;
pub const STD: f32 = 0.502;

/// Images whose header declares more pixels than this are refused before decoding.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;
/// Files larger than this are refused before reading.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// What deeprank decodes, for messages.
pub const FORMATS: &str = "JPEG, PNG, WebP, GIF (first frame), BMP or TIFF";

/// Why an image could not be used; the message says what is wrong with the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read file: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty file")]
    Empty,
    #[error("file is {0} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    FileTooLarge(u64),
    /// The content is not an image format deeprank decodes (or a variant of one it cannot decode).
    #[error("unsupported format: {0}; convert it to {FORMATS}")]
    Unsupported(String),
    #[error("image is {w}x{h} = {} pixels, over the limit of {max} pixels", (*w as u64) * (*h as u64))]
    TooManyPixels { w: u32, h: u32, max: u64 },
    #[error("corrupt or truncated image: {0}")]
    Decode(String),
}

fn decode_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => ImageError::Unsupported(u.to_string()),
        image::ImageError::Limits(l) => ImageError::Decode(format!("over the memory limit: {l}")),
        other => ImageError::Decode(other.to_string()),
    }
}

/// The image formats deeprank decodes, recognised by their content (never by the file name).
fn supported(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    let format = image::guess_format(bytes)
        .map_err(|_| ImageError::Unsupported("not an image format deeprank recognises".into()))?;
    match format {
        ImageFormat::Jpeg => {
            // The JPEG decoder fills a cut-off scan with grey instead of failing: require the
            // end-of-image marker after the last start-of-scan.
            let last_sos = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
            let ends = last_sos.is_some_and(|i| bytes[i..].windows(2).any(|w| w == [0xff, 0xd9]));
            if !ends {
                return Err(ImageError::Decode(
                    "truncated JPEG (no end-of-image marker)".into(),
                ));
            }
            Ok(format)
        }
        ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Gif
        | ImageFormat::Bmp
        | ImageFormat::Tiff => Ok(format),
        other => {
            let name = format!("{other:?}").to_uppercase();
            Err(ImageError::Unsupported(format!("{name} image")))
        }
    }
}

/// Decodes image bytes (JPEG, PNG, WebP, GIF's first frame, BMP, TIFF) to RGB8, upright by the
/// EXIF orientation as browsers show it, refusing bombs by the header's declared size.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = supported(bytes)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 26));
    reader.limits(limits);
    // Reading the header only: the size is checked before any pixel buffer exists.
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > max_pixels || w == 0 || h == 0 {
        return Err(ImageError::TooManyPixels {
            w,
            h,
            max: max_pixels,
        });
    }
    // A damaged EXIF block is ignored, as browsers do; the pixels still decide.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    let mut img = DynamicImage::ImageRgb8(img.into_rgb8());
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Reads and decodes an image file to RGB8.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(ImageError::FileTooLarge(meta.len()));
    }
    let bytes = std::fs::read(path)?;
    decode_rgb(&bytes, DEFAULT_MAX_PIXELS)
}

/// Bilinear resize (Pillow-compatible convolution) of an RGB image to `size`×`size`.
pub fn resize_rgb(img: &RgbImage, size: u32) -> Result<RgbImage> {
    if img.width() == size && img.height() == size {
        return Ok(img.clone());
    }
    let src = FirImage::from_vec_u8(
        img.width(),
        img.height(),
        img.as_raw().clone(),
        PixelType::U8x3,
    )
    .map_err(|e| anyhow!("resize: {e}"))?;
    let mut dst = FirImage::new(size, size, PixelType::U8x3);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| anyhow!("resize: {e}"))?;
    RgbImage::from_raw(size, size, dst.into_vec()).ok_or_else(|| anyhow!("resize: bad buffer"))
}

/// Writes the normalised CHW tensor of an RGB image of side `size` into `out` (len 3·size²).
pub fn normalise_chw(img: &RgbImage, out: &mut [f32]) -> Result<()> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    if out.len() != 3 * plane {
        bail!(
            "tensor buffer has {} values, expected {}",
            out.len(),
            3 * plane
        );
    }
    let scale = 1.0 / (255.0 * STD);
    let shift = MEAN / STD;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = px[0] as f32 * scale - shift;
        g[i] = px[1] as f32 * scale - shift;
        b[i] = px[2] as f32 * scale - shift;
    }
    Ok(())
}

/// Decode + resize + normalise one file into `out` (len 3·size²).
pub fn load_tensor(path: &Path, size: u32, out: &mut [f32]) -> Result<(), ImageError> {
    let img = load_rgb(path)?;
    let img = resize_rgb(&img, size).map_err(|e| ImageError::Decode(e.to_string()))?;
    normalise_chw(&img, out).map_err(|e| ImageError::Decode(e.to_string()))
}

/// Input sides the network accepts (multiples of 32 keep every stride exact).
pub fn check_size(size: u32) -> Result<()> {
    if !(32..=1024).contains(&size) || !size.is_multiple_of(32) {
        bail!(
            "--size {size} is not supported: use a multiple of 32 between 32 and 1024 (e.g. 64, 128, 224)"
        );
    }
    Ok(())
}

/// Input sides the pretrained network accepts: any even side (the ImageNet sizes of Lite1 and
/// Lite2, 240 and 260, are not multiples of 32; the later feature maps then have odd sides, padded
/// as PyTorch pads them).
pub fn check_pretrained_size(size: u32) -> Result<()> {
    if !(32..=1024).contains(&size) || !size.is_multiple_of(2) {
        bail!(
            "--size {size} is not supported for the pretrained network: use an even side between 32 \
             and 1024 (e.g. 128, 224, 240, 260)"
        );
    }
    Ok(())
}
