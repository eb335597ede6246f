//! Inpainting masks as images: white repaints, black keeps. Blurred the way diffusers'
//! `VaeImageProcessor.blur` does it (PIL's `GaussianBlur`, an extended box-blur approximation,
//! reproduced here byte for byte), fitted to the generation's size like the photo, binarized at
//! one half, and the rectangle around the masked region that `padding_mask_crop` works in.

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageBuffer, Pixel, RgbImage};

/// The largest blur radius a request may ask for, in pixels.
pub const MAX_MASK_BLUR: f32 = 64.0;

/// PIL's `ImageFilter.GaussianBlur(radius)` on an 8-bit mask: three passes of a box blur with a
/// fractional radius along each axis, in PIL's fixed-point arithmetic, edges extended.
pub fn gaussian_blur(mask: &GrayImage, radius: f32) -> GrayImage {
    if radius <= 0.0 || mask.width() == 0 || mask.height() == 0 {
        return mask.clone();
    }
    const PASSES: usize = 3;
    let box_radius = box_radius_for(radius, PASSES as f32);
    let (width, height) = (mask.width() as usize, mask.height() as usize);
    let mut rows = mask.as_raw().clone();
    for _ in 0..PASSES {
        blur_lines(&mut rows, width, height, box_radius);
    }
    let mut columns = transpose(&rows, width, height);
    for _ in 0..PASSES {
        blur_lines(&mut columns, height, width, box_radius);
    }
    GrayImage::from_raw(mask.width(), mask.height(), transpose(&columns, height, width))
        .expect("the blurred mask keeps its size")
}

/// The box radius whose `passes`-fold repetition has the Gaussian's variance (Gwosdek et al.
/// 2011, as PIL's `_gaussian_blur_radius` computes it in single precision).
fn box_radius_for(radius: f32, passes: f32) -> f32 {
    let sigma2 = radius * radius / passes;
    // PIL's C mixes double literals into these two lines and single precision into the rest.
    let length = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let whole = ((f64::from(length) - 1.0) / 2.0).floor() as f32;
    let fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2)
        / (6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0)));
    whole + fraction
}

/// One box-blur pass over each of the `lines` lines of `len` bytes in `data`, in place: PIL's
/// `ImagingHorizontalBoxBlur`, whose weights are 24-bit fixed point and whose two outermost
/// pixels count by the radius's fraction.
fn blur_lines(data: &mut [u8], len: usize, lines: usize, radius: f32) {
    let whole = radius as usize;
    let inner = ((1u64 << 24) as f32 / (radius * 2.0 + 1.0)) as u32;
    let outer = ((1u32 << 24) - (whole as u32 * 2 + 1) * inner) / 2;
    let last = len - 1;
    let mut out = vec![0u8; len];
    for line in data.chunks_mut(len).take(lines) {
        // The window of pixel x is x-whole..=x+whole plus the fractional pixels x±(whole+1),
        // with coordinates clamped to the line.
        let at = |i: isize| u32::from(line[i.clamp(0, last as isize) as usize]);
        let mut acc: u32 = (-(whole as isize)..=whole as isize).map(|i| at(i - 1)).sum();
        for (x, value) in out.iter_mut().enumerate() {
            let x = x as isize;
            acc = acc + at(x + whole as isize) - at(x - whole as isize - 1);
            let bulk = acc * inner + (at(x - whole as isize - 1) + at(x + whole as isize + 1)) * outer;
            *value = ((bulk + (1 << 23)) >> 24) as u8;
        }
        line.copy_from_slice(&out);
    }
}

fn transpose(data: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for y in 0..height {
        for x in 0..width {
            out[x * height + y] = data[y * width + x];
        }
    }
    out
}

/// A mask from any image: its luminance (ITU-R 601, as PIL's `convert("L")`), times its alpha
/// where it has one, so transparent pixels keep and only opaque light ones repaint (white strokes
/// painted on a transparent canvas are a mask as they are).
pub fn from_image(image: &DynamicImage) -> GrayImage {
    let rgba = image.to_rgba8();
    GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let luma = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
        image::Luma([((luma * u32::from(a) + 127) / 255) as u8])
    })
}

/// `image` scaled to cover `width` × `height` (Lanczos) and centre-cropped to it: how the photo,
/// its mask and the pixels pasted back are fitted to a generation's size.
pub fn fit<P>(image: &ImageBuffer<P, Vec<u8>>, width: u32, height: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let scale =
        f64::max(f64::from(width) / f64::from(image.width()), f64::from(height) / f64::from(image.height()));
    let scaled_w = ((f64::from(image.width()) * scale).round() as u32).max(width);
    let scaled_h = ((f64::from(image.height()) * scale).round() as u32).max(height);
    let scaled = image::imageops::resize(image, scaled_w, scaled_h, FilterType::Lanczos3);
    image::imageops::crop_imm(&scaled, (scaled_w - width) / 2, (scaled_h - height) / 2, width, height)
        .to_image()
}

/// `image` resized to `width` × `height` without keeping its aspect (a mask drawn over a photo
/// lines up with it whatever its own size; a cropped region scales to the generation's size).
pub fn stretch<P>(image: &ImageBuffer<P, Vec<u8>>, width: u32, height: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    image::imageops::resize(image, width, height, FilterType::Lanczos3)
}

/// Whether any pixel would be repainted once binarized (a value of 128 or more: at least one half).
pub fn repaints_anything(mask: &GrayImage) -> bool {
    mask.as_raw().iter().any(|&v| v >= 128)
}

/// A rectangle `[x1, x2) × [y1, y2)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Left edge.
    pub x1: u32,
    /// Top edge.
    pub y1: u32,
    /// Right edge, exclusive.
    pub x2: u32,
    /// Bottom edge, exclusive.
    pub y2: u32,
}

impl Region {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.x2 - self.x1
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.y2 - self.y1
    }
}

/// diffusers' `VaeImageProcessor.get_crop_region`: the smallest rectangle holding every non-zero
/// pixel of `mask`, grown by `pad` on each side, then widened or heightened (shifted back inside
/// the mask where it overflows) to the aspect of `width` × `height`. `None` for an empty mask.
pub fn crop_region(mask: &GrayImage, width: u32, height: u32, pad: u32) -> Option<Region> {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let column_used = |x: i64| (0..h).any(|y| mask.get_pixel(x as u32, y as u32)[0] != 0);
    let row_used = |y: i64| (0..w).any(|x| mask.get_pixel(x as u32, y as u32)[0] != 0);
    let left = (0..w).find(|&x| column_used(x))?;
    let right = (0..w).rev().find(|&x| column_used(x))? + 1;
    let top = (0..h).find(|&y| row_used(y))?;
    let bottom = (0..h).rev().find(|&y| row_used(y))? + 1;
    let pad = i64::from(pad);
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + pad).min(w), (bottom + pad).min(h));
    let ratio_region = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = f64::from(width) / f64::from(height);
    if ratio_region > ratio_processing {
        let desired = (x2 - x1) as f64 / ratio_processing;
        let diff = (desired - (y2 - y1) as f64) as i64;
        y1 -= diff / 2;
        y2 += diff - diff / 2;
        if y2 >= h {
            let over = y2 - h;
            y2 -= over;
            y1 -= over;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        y2 = y2.min(h);
    } else {
        let desired = (y2 - y1) as f64 * ratio_processing;
        let diff = (desired - (x2 - x1) as f64) as i64;
        x1 -= diff / 2;
        x2 += diff - diff / 2;
        if x2 >= w {
            let over = x2 - w;
            x2 -= over;
            x1 -= over;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        x2 = x2.min(w);
    }
    Some(Region { x1: x1 as u32, y1: y1 as u32, x2: x2 as u32, y2: y2 as u32 })
}

/// `generated` laid over `photo` where `mask` repaints: each pixel
/// `(generated · m + photo · (255 − m)) / 255` for mask value `m`, so the photo's pixels come
/// back exactly where the mask is black and the generation's where it is white (diffusers'
/// `apply_overlay`, with the mask's soft edge as the blend).
pub fn overlay(generated: &RgbImage, photo: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(photo.width(), photo.height(), |x, y| {
        let m = u32::from(mask.get_pixel(x, y)[0]);
        let (g, p) = (generated.get_pixel(x, y), photo.get_pixel(x, y));
        image::Rgb(std::array::from_fn(|c| {
            ((u32::from(g[c]) * m + u32::from(p[c]) * (255 - m) + 127) / 255) as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square_mask() -> GrayImage {
        GrayImage::from_fn(32, 24, |x, y| {
            image::Luma([if (8..20).contains(&x) && (6..14).contains(&y) { 255 } else { 0 }])
        })
    }

    #[test]
    fn blur_keeps_a_flat_mask_and_spreads_an_edge() {
        let flat = GrayImage::from_pixel(9, 5, image::Luma([200]));
        assert_eq!(gaussian_blur(&flat, 2.5), flat);
        let blurred = gaussian_blur(&square_mask(), 2.0);
        assert_eq!(blurred.get_pixel(0, 0)[0], 0);
        assert!(blurred.get_pixel(14, 10)[0] > 200);
        let edge = blurred.get_pixel(7, 10)[0];
        assert!((40..215).contains(&edge), "edge value {edge}");
    }

    #[test]
    fn the_crop_region_holds_the_mask_at_the_processing_aspect() {
        let region = crop_region(&square_mask(), 64, 64, 2).unwrap();
        assert_eq!(region.width(), region.height());
        assert!(region.x1 <= 6 && region.x2 >= 22 && region.y1 <= 4 && region.y2 >= 16);
        assert_eq!(crop_region(&GrayImage::new(8, 8), 64, 64, 0), None);
    }

    #[test]
    fn colour_becomes_luminance_and_transparency_keeps() {
        let image = image::RgbaImage::from_raw(
            4,
            1,
            vec![255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 255, 0, 0, 0, 255],
        )
        .unwrap();
        let mask = from_image(&DynamicImage::ImageRgba8(image));
        assert_eq!(mask.as_raw(), &[255, 0, 76, 0]);
    }

    #[test]
    fn overlay_keeps_the_photo_where_the_mask_is_black() {
        let photo = RgbImage::from_pixel(4, 1, image::Rgb([10, 20, 30]));
        let generated = RgbImage::from_pixel(4, 1, image::Rgb([250, 240, 230]));
        let mask = GrayImage::from_raw(4, 1, vec![0, 255, 128, 1]).unwrap();
        let out = overlay(&generated, &photo, &mask);
        assert_eq!(out.get_pixel(0, 0), photo.get_pixel(0, 0));
        assert_eq!(out.get_pixel(1, 0), generated.get_pixel(1, 0));
        assert_eq!(out.get_pixel(2, 0)[0], 130);
    }
}
