//! Photos users hand in as bytes (an upload, a photo inline with a generation, the CLI's file):
//! checked before any work is queued, turned upright, and keyed under
//! `images/uploads/YYYY/MM/DD/<uuid>.<ext>` in the object store.
//!
//! The type is sniffed from the bytes, never taken from a Content-Type; the dimensions are read
//! from the header and checked before decoding; the whole image is decoded once, so a valid header
//! in front of garbage is refused here and not at the task's fetch stage. A photo whose EXIF
//! orientation turns it (most phone photos) is stored upright, re-encoded, so that what the user
//! sees of the stored original and what the pipeline sees agree.

use std::io::Cursor;

use bytes::Bytes;
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageFormat};
use sha2::{Digest, Sha256};

use crate::inference::vision::{ImageError, Upright, decode_upright, probe_header};
use crate::storage::{ObjectStore, StorageError, new_upload_key};

/// Quality of a JPEG re-encoded to store it upright.
const JPEG_QUALITY: u8 = 90;

/// The limits a handed-in photo is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Intake {
    /// Largest photo, in bytes.
    pub max_bytes: u64,
    /// Largest photo, in pixels (width × height, from the header).
    pub max_pixels: u64,
}

/// A photo that passed the checks, ready to store.
#[derive(Debug, Clone)]
pub struct Photo {
    /// The object key it is stored under.
    pub key: String,
    /// What is stored: the bytes as sent, or the upright re-encoding.
    pub bytes: Bytes,
    /// The stored bytes' media type.
    pub content_type: &'static str,
    /// Upright width in pixels.
    pub width: u32,
    /// Upright height in pixels.
    pub height: u32,
    /// Hex SHA-256 of the stored bytes.
    pub sha256: String,
}

/// Why a photo was refused.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// No bytes at all.
    #[error("The photo is empty.")]
    Empty,
    /// More bytes than allowed.
    #[error("The photo is larger than the limit of {limit} bytes.")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// A format people do send but the models cannot read.
    #[error("{kind} is not accepted; send a JPEG, PNG, WebP, GIF, BMP or TIFF photo.")]
    Unsupported {
        /// What the bytes are.
        kind: &'static str,
    },
    /// Not a usable image: unknown format, too many pixels, too small, or corrupt.
    #[error("The photo cannot be used: {0}.")]
    Image(#[from] ImageError),
    /// Re-encoding the upright image failed.
    #[error("The upright photo cannot be encoded: {0}.")]
    Encode(String),
}

impl Intake {
    /// Checks `bytes` and prepares them for the store; CPU-bound (it decodes the whole image), so
    /// call it off the async runtime or through [`Intake::check_blocking`].
    pub fn check(&self, bytes: Bytes) -> Result<Photo, IntakeError> {
        self.check_size_and_kind(bytes.len() as u64, &bytes)?;
        let upright = decode_upright(&bytes, self.max_pixels)?;
        let (width, height) = (upright.image.width(), upright.image.height());
        let (bytes, format) = if upright.turned { reencode(upright)? } else { (bytes, upright.format) };
        let (extension, content_type) = naming(format);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Photo { key: new_upload_key(extension), bytes, content_type, width, height, sha256 })
    }

    /// Checks an object a client put into the store itself (a presigned upload) from its size and
    /// first bytes, before a generation naming it is queued: empty, too large, a refused format,
    /// too many pixels or too few. The whole image is decoded at the task's fetch stage, and a
    /// header that runs past `head` (a TIFF's, say) is left to that stage too.
    pub fn check_head(&self, size: u64, head: &[u8]) -> Result<(), IntakeError> {
        self.check_size_and_kind(size, head)?;
        match probe_header(head, self.max_pixels) {
            Err(ImageError::Corrupt { .. }) if (head.len() as u64) < size => Ok(()),
            probed => probed.map(drop).map_err(IntakeError::Image),
        }
    }

    fn check_size_and_kind(&self, size: u64, head: &[u8]) -> Result<(), IntakeError> {
        if size == 0 {
            return Err(IntakeError::Empty);
        }
        if size > self.max_bytes {
            return Err(IntakeError::TooLarge { limit: self.max_bytes });
        }
        match unsupported_kind(head) {
            Some(kind) => Err(IntakeError::Unsupported { kind }),
            None => Ok(()),
        }
    }

    /// [`Intake::check`] on a blocking thread.
    pub async fn check_blocking(&self, bytes: Bytes) -> Result<Photo, IntakeError> {
        let intake = *self;
        tokio::task::spawn_blocking(move || intake.check(bytes))
            .await
            .unwrap_or_else(|e| Err(IntakeError::Encode(format!("checking the photo panicked: {e}"))))
    }
}

impl Photo {
    /// Stores the photo under its key; returns the URL the store hands out for it.
    pub async fn store(&self, store: &dyn ObjectStore) -> Result<String, StorageError> {
        store.put_image(&self.key, self.bytes.clone()).await
    }
}

/// What the bytes are when they are a format people send but the models cannot read.
fn unsupported_kind(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return match &bytes[8..12] {
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"mif1" | b"msf1" => Some("HEIC"),
            b"avif" | b"avis" => Some("AVIF"),
            _ => None,
        };
    }
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).trim_start().to_ascii_lowercase();
    if head.starts_with("<svg") || (head.starts_with("<?xml") && head.contains("<svg")) {
        return Some("SVG");
    }
    if head.starts_with("<!doctype html") || head.starts_with("<html") {
        return Some("HTML");
    }
    None
}

/// The upright image's bytes: JPEG stays JPEG (quality 90), anything else becomes PNG.
fn reencode(upright: Upright) -> Result<(Bytes, ImageFormat), IntakeError> {
    let mut out = Cursor::new(Vec::new());
    let encode = |e: image::ImageError| IntakeError::Encode(e.to_string());
    let format = if upright.format == ImageFormat::Jpeg {
        let rgb = DynamicImage::ImageRgb8(upright.image.into_rgb8());
        rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)).map_err(encode)?;
        ImageFormat::Jpeg
    } else {
        upright.image.write_to(&mut out, ImageFormat::Png).map_err(encode)?;
        ImageFormat::Png
    };
    Ok((Bytes::from(out.into_inner()), format))
}

/// The key's extension for a photo of media type `content_type`, where it is a type photos are
/// accepted in.
pub fn extension_for(content_type: &str) -> Option<&'static str> {
    let formats = [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ];
    formats
        .into_iter()
        .map(naming)
        .find(|(_, media)| media.eq_ignore_ascii_case(content_type.trim()))
        .map(|(ext, _)| ext)
}

/// The key's extension and the media type of a stored format.
fn naming(format: ImageFormat) -> (&'static str, &'static str) {
    match format {
        ImageFormat::Jpeg => ("jpg", "image/jpeg"),
        ImageFormat::Png => ("png", "image/png"),
        ImageFormat::WebP => ("webp", "image/webp"),
        ImageFormat::Gif => ("gif", "image/gif"),
        ImageFormat::Bmp => ("bmp", "image/bmp"),
        ImageFormat::Tiff => ("tiff", "image/tiff"),
        _ => ("bin", "application/octet-stream"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTAKE: Intake = Intake { max_bytes: 1_000_000, max_pixels: 4_000_000 };

    fn png(width: u32, height: u32) -> Bytes {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::new_rgb8(width, height).write_to(&mut out, ImageFormat::Png).unwrap();
        Bytes::from(out.into_inner())
    }

    #[test]
    fn a_png_is_stored_as_sent() {
        let bytes = png(64, 48);
        let photo = INTAKE.check(bytes.clone()).unwrap();
        assert_eq!(photo.bytes, bytes);
        assert_eq!((photo.width, photo.height, photo.content_type), (64, 48, "image/png"));
        assert!(photo.key.starts_with("images/uploads/") && photo.key.ends_with(".png"), "{}", photo.key);
        assert_eq!(photo.sha256, hex::encode(Sha256::digest(&bytes)));
    }

    /// A 64×32 JPEG whose EXIF says "rotate 90° clockwise to view", as phones write them.
    fn sideways_jpeg() -> Bytes {
        let mut image = image::RgbImage::new(64, 32);
        for (x, _, pixel) in image.enumerate_pixels_mut() {
            *pixel = if x < 32 { image::Rgb([250, 20, 20]) } else { image::Rgb([20, 20, 250]) };
        }
        let mut jpeg = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(image).write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        // APP1 "Exif": a big-endian TIFF header and one IFD entry, Orientation (0x0112) = 6.
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        exif.extend([0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xff, 0xe1]);
        out.extend(u16::try_from(exif.len() + 2).unwrap().to_be_bytes());
        out.extend(exif);
        out.extend(&jpeg[2..]);
        Bytes::from(out)
    }

    #[test]
    fn a_sideways_phone_photo_is_stored_upright() {
        let photo = INTAKE.check(sideways_jpeg()).unwrap();
        assert_eq!((photo.width, photo.height, photo.content_type), (32, 64, "image/jpeg"));
        assert!(photo.key.ends_with(".jpg"), "{}", photo.key);
        // Stored without the EXIF turn: the bytes alone show it upright, red (the left half) on top.
        let stored = image::load_from_memory(&photo.bytes).unwrap().into_rgb8();
        assert_eq!(stored.dimensions(), (32, 64));
        let (top, bottom) = (stored.get_pixel(16, 8), stored.get_pixel(16, 56));
        assert!(top[0] > 200 && top[2] < 60, "{top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "{bottom:?}");
    }

    #[test]
    fn a_stored_objects_first_bytes_are_enough_to_refuse_it() {
        let whole = png(64, 48);
        INTAKE.check_head(whole.len() as u64, &whole[..64]).unwrap();
        assert!(matches!(INTAKE.check_head(0, b""), Err(IntakeError::Empty)));
        assert!(matches!(INTAKE.check_head(2_000_000, &whole[..64]), Err(IntakeError::TooLarge { .. })));
        let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>";
        assert!(matches!(
            INTAKE.check_head(svg.len() as u64, svg),
            Err(IntakeError::Unsupported { kind: "SVG" })
        ));
        let huge = png(3000, 2000);
        assert!(matches!(
            INTAKE.check_head(huge.len() as u64, &huge[..64]),
            Err(IntakeError::Image(ImageError::TooLarge { width: 3000, height: 2000, .. }))
        ));
        let text = b"just some words, not a photo at all";
        assert!(matches!(INTAKE.check_head(1000, text), Err(IntakeError::Image(ImageError::NotAnImage))));
        // A header cut off by the read is left to the full decode; a whole object is not.
        INTAKE.check_head(whole.len() as u64, &whole[..12]).unwrap();
        assert!(matches!(
            INTAKE.check_head(12, &whole[..12]),
            Err(IntakeError::Image(ImageError::Corrupt { .. }))
        ));
    }

    #[test]
    fn formats_people_send_are_named_in_the_refusal() {
        let heic = Bytes::from_static(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic");
        let svg = Bytes::from_static(b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"/>");
        let html = Bytes::from_static(b"  <!DOCTYPE html><html></html>");
        for (bytes, kind) in [(heic, "HEIC"), (svg, "SVG"), (html, "HTML")] {
            let refused = INTAKE.check(bytes).unwrap_err().to_string();
            assert!(refused.starts_with(kind) && refused.contains("JPEG, PNG"), "{refused}");
        }
    }

    #[test]
    fn empty_oversized_and_garbage_photos_are_refused() {
        assert!(matches!(INTAKE.check(Bytes::new()), Err(IntakeError::Empty)));
        let small = Intake { max_bytes: 10, ..INTAKE };
        assert!(matches!(small.check(png(64, 64)), Err(IntakeError::TooLarge { limit: 10 })));
        let mut garbage = png(64, 64)[..40].to_vec();
        garbage.extend(std::iter::repeat_n(0x5a, 200));
        assert!(matches!(INTAKE.check(Bytes::from(garbage)), Err(IntakeError::Image(_))));
        let few_pixels = Intake { max_pixels: 100, ..INTAKE };
        assert!(matches!(
            few_pixels.check(png(64, 64)),
            Err(IntakeError::Image(ImageError::TooLarge { .. }))
        ));
    }
}
