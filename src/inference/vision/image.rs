//! Turning untrusted bytes into an upright RGB image the models can read.
//!
//! The format is sniffed from the bytes (a URL's extension or content type proves nothing), and
//! the dimensions are read from the header and checked against a pixel cap before any pixel is
//! decoded, so a small file that claims to be enormous is refused without allocating for it.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage, RgbaImage};

/// The shortest side a photo may have; anything smaller carries no scene to analyse.
pub const MIN_SIDE: u32 = 32;

/// Why bytes could not be turned into an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes start like no image format we decode.
    #[error("not an image: the bytes match no supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)")]
    NotAnImage,
    /// The header claims more pixels than allowed.
    #[error("image is {width}x{height} ({pixels} pixels), more than the {max_pixels} allowed")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The configured cap.
        max_pixels: u64,
    },
    /// A side is shorter than [`MIN_SIDE`].
    #[error("image is {width}x{height}; each side must be at least {MIN_SIDE} pixels")]
    TooSmall {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// The format was recognised but the data is truncated or corrupt.
    #[error("cannot decode the {format} image: {reason}")]
    Corrupt {
        /// The sniffed format.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },
}

/// Decodes `bytes` into an upright 8-bit RGB image of at most `max_pixels` pixels.
///
/// EXIF orientation is applied; grayscale, CMYK, 16-bit and alpha images are converted to RGB
/// (alpha composited over white, as a viewer would show it).
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    decode_upright(bytes, max_pixels).map(|decoded| to_rgb(decoded.image))
}

/// An image decoded and turned upright.
pub struct Upright {
    /// The pixels, EXIF orientation applied.
    pub image: DynamicImage,
    /// The format sniffed from the bytes.
    pub format: ImageFormat,
    /// Whether the EXIF orientation turned or flipped the image, so the bytes show it otherwise.
    pub turned: bool,
}

/// Decodes `bytes` (at most `max_pixels` pixels, checked from the header first) and applies the
/// EXIF orientation, keeping the decoder's pixel format.
pub fn decode_upright(bytes: &[u8], max_pixels: u64) -> Result<Upright, ImageError> {
    let Header { format, width, height } = probe_header(bytes, max_pixels)?;
    let format_name = format_name(format);
    let corrupt = |e: image::ImageError| ImageError::Corrupt { format: format_name, reason: e.to_string() };

    // The JPEG decoder pads a truncated scan with grey instead of failing.
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageError::Corrupt {
            format: format_name,
            reason: "truncated: no end-of-image marker".into(),
        });
    }
    let pixels = u64::from(width) * u64::from(height);

    // The decoders enforce a budget too, in case a file's pixel data disagrees with its header.
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(pixels.saturating_mul(16).max(64 << 20));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let limited = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => ImageError::TooLarge { width, height, pixels, max_pixels },
        other => corrupt(other),
    };
    let mut decoder = reader.into_decoder().map_err(limited)?;
    // A broken EXIF block should not cost the user their photo: decode it unrotated instead.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(limited)?;
    image.apply_orientation(orientation);
    Ok(Upright { image, format, turned: orientation != Orientation::NoTransforms })
}

/// What an image's header says: its format and its dimensions as stored (before EXIF orientation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format sniffed from the bytes.
    pub format: ImageFormat,
    /// Stored width in pixels.
    pub width: u32,
    /// Stored height in pixels.
    pub height: u32,
}

/// Reads the format and dimensions from the first bytes of an image, without decoding any pixel,
/// and checks them against `max_pixels` and [`MIN_SIDE`]. `head` may be only the start of the
/// file: every accepted format but TIFF keeps its dimensions in the first few kilobytes.
pub fn probe_header(head: &[u8], max_pixels: u64) -> Result<Header, ImageError> {
    let format = ImageReader::new(Cursor::new(head))
        .with_guessed_format()
        .ok()
        .and_then(|reader| reader.format())
        .ok_or(ImageError::NotAnImage)?;
    let mut probe = ImageReader::with_format(Cursor::new(head), format);
    probe.no_limits();
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt { format: format_name(format), reason: e.to_string() })?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge { width, height, pixels, max_pixels });
    }
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(ImageError::TooSmall { width, height });
    }
    Ok(Header { format, width, height })
}

fn format_name(format: ImageFormat) -> &'static str {
    format.extensions_str().first().copied().unwrap_or("image")
}

/// Whether the JPEG's segments run through to its end-of-image marker.
///
/// Segments are skipped by their length (so an EXIF thumbnail's own markers do not count), and
/// entropy-coded data is scanned for the next marker (`FF 00` is a stuffed byte and `FF D0`..`FF D7`
/// are restart markers). Bytes after the marker, such as a motion photo's video, are ignored.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const SOS: u8 = 0xda;
    const EOI: u8 = 0xd9;
    let mut i = 2; // past SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xff {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            EOI => return true,
            0xff => i += 1, // fill byte
            0x01 | 0xd0..=0xd7 => i += 2,
            _ => {
                let Some(length) =
                    bytes.get(i + 2..i + 4).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
                else {
                    return false;
                };
                i += 2 + length;
                if marker == SOS {
                    // Scan to the next real marker.
                    while i + 1 < bytes.len()
                        && (bytes[i] != 0xff || matches!(bytes[i + 1], 0x00 | 0xd0..=0xd7))
                    {
                        i += 1;
                    }
                }
            }
        }
    }
    false
}

fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba: RgbaImage = image.into_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over_white =
            |c: u8| ((u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a)) + 127) / 255) as u8;
        image::Rgb([over_white(r), over_white(g), over_white(b)])
    })
}
