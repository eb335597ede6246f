//! The photo's shape: which size the generated image gets, and how the photo is fitted to it.
//!
//! By default ([`ResizeMode::Fit`]) the image keeps the photo's aspect ratio at the model's native
//! area (width × height ≈ native²), each side rounded to the nearest multiple the UNet needs and
//! the longer side at most `--max-side`: a 1024×522 photo on a model of native side 256 whose
//! UNet needs multiples of 16 becomes 352×176. The other modes give the native square (or the
//! request's `width`/`height`) and differ in how the photo fills it.

use image::RgbImage;
use image::imageops::{self, FilterType};

use crate::core::ResizeMode;

/// Smallest side an image is given, as for a request's `width`/`height`.
const MIN_SIDE: u32 = 64;

/// What decides an image's size besides the request.
#[derive(Debug, Clone, Copy)]
pub struct SizeRule {
    /// The model's training side in pixels.
    pub native: u32,
    /// Sides must be multiples of this.
    pub multiple: u32,
    /// Largest side allowed (`--max-side`).
    pub max_side: u32,
}

impl SizeRule {
    /// The output (width, height) for a photo of `photo` dimensions (none: text-to-image), the
    /// request's `width`/`height` when it gives them.
    pub fn output_size(
        &self,
        photo: Option<(u32, u32)>,
        mode: ResizeMode,
        width: Option<u32>,
        height: Option<u32>,
    ) -> (u32, u32) {
        let aspect = match (photo, mode) {
            (Some((w, h)), ResizeMode::Fit) if w > 0 && h > 0 => Some(f64::from(w) / f64::from(h)),
            _ => None,
        };
        match (width, height) {
            (Some(w), Some(h)) => (w, h),
            (Some(w), None) => (w, aspect.map_or(self.native, |a| self.side(f64::from(w) / a))),
            (None, Some(h)) => (aspect.map_or(self.native, |a| self.side(f64::from(h) * a)), h),
            (None, None) => {
                let aspect = aspect.unwrap_or(1.0);
                let native = f64::from(self.native);
                let (mut w, mut h) = (native * aspect.sqrt(), native / aspect.sqrt());
                let longer = w.max(h);
                if longer > f64::from(self.max_side) {
                    let shrink = f64::from(self.max_side) / longer;
                    (w, h) = (w * shrink, h * shrink);
                }
                (self.side(w), self.side(h))
            }
        }
    }

    /// `side` rounded to the nearest multiple, within [64, max_side].
    fn side(&self, side: f64) -> u32 {
        let multiple = self.multiple.max(1);
        let lowest = MIN_SIDE.div_ceil(multiple) * multiple;
        let highest = (self.max_side / multiple * multiple).max(lowest);
        let rounded = ((side / f64::from(multiple)).round() as u32).saturating_mul(multiple);
        rounded.clamp(lowest, highest)
    }
}

/// The photo at exactly `width`×`height`, the way `mode` says: `fit` and `crop` scale it to
/// cover the size and cut the centre out (for `fit` at its own size, only the few pixels the
/// rounding adds), `fill` scales it to fit inside and extends its edge pixels into the rest,
/// `stretch` scales each axis on its own.
pub fn shape_photo(photo: &RgbImage, mode: ResizeMode, width: u32, height: u32) -> RgbImage {
    if photo.dimensions() == (width, height) {
        return photo.clone();
    }
    let (photo_w, photo_h) = (f64::from(photo.width()), f64::from(photo.height()));
    let (scale_x, scale_y) = (f64::from(width) / photo_w, f64::from(height) / photo_h);
    match mode {
        ResizeMode::Fit | ResizeMode::Crop => {
            let scale = scale_x.max(scale_y);
            let scaled_w = ((photo_w * scale).round() as u32).max(width);
            let scaled_h = ((photo_h * scale).round() as u32).max(height);
            let scaled = imageops::resize(photo, scaled_w, scaled_h, FilterType::Lanczos3);
            imageops::crop_imm(&scaled, (scaled_w - width) / 2, (scaled_h - height) / 2, width, height)
                .to_image()
        }
        ResizeMode::Fill => {
            let scale = scale_x.min(scale_y);
            let scaled_w = ((photo_w * scale).round() as u32).clamp(1, width);
            let scaled_h = ((photo_h * scale).round() as u32).clamp(1, height);
            let scaled = imageops::resize(photo, scaled_w, scaled_h, FilterType::Lanczos3);
            let (left, top) = ((width - scaled_w) / 2, (height - scaled_h) / 2);
            RgbImage::from_fn(width, height, |x, y| {
                let inside_x = x.saturating_sub(left).min(scaled_w - 1);
                let inside_y = y.saturating_sub(top).min(scaled_h - 1);
                *scaled.get_pixel(inside_x, inside_y)
            })
        }
        ResizeMode::Stretch => imageops::resize(photo, width, height, FilterType::Lanczos3),
    }
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    use super::*;

    const TINY: SizeRule = SizeRule { native: 256, multiple: 16, max_side: 2048 };

    #[test]
    fn a_wide_photo_keeps_its_shape_at_the_models_area() {
        assert_eq!(TINY.output_size(Some((1024, 522)), ResizeMode::Fit, None, None), (352, 176));
        // darknet's dog.jpg, 4:3.
        assert_eq!(TINY.output_size(Some((768, 576)), ResizeMode::Fit, None, None), (288, 224));
        // A portrait phone photo; SD 1.5 (native 512, multiples of 64).
        let sd15 = SizeRule { native: 512, multiple: 64, max_side: 2048 };
        assert_eq!(sd15.output_size(Some((3024, 4032)), ResizeMode::Fit, None, None), (448, 576));
        assert_eq!(TINY.output_size(Some((500, 500)), ResizeMode::Fit, None, None), (256, 256));
    }

    #[test]
    fn the_longer_side_stays_within_the_limit_and_the_shorter_above_64() {
        let limited = SizeRule { native: 1024, multiple: 8, max_side: 1280 };
        assert_eq!(limited.output_size(Some((4000, 1000)), ResizeMode::Fit, None, None), (1280, 320));
        assert_eq!(TINY.output_size(Some((10_000, 100)), ResizeMode::Fit, None, None), (2048, 64));
    }

    #[test]
    fn other_modes_and_text_to_image_get_the_square_and_the_request_overrides() {
        for mode in [ResizeMode::Crop, ResizeMode::Fill, ResizeMode::Stretch] {
            assert_eq!(TINY.output_size(Some((1024, 522)), mode, None, None), (256, 256), "{mode:?}");
        }
        assert_eq!(TINY.output_size(None, ResizeMode::Fit, None, None), (256, 256));
        assert_eq!(TINY.output_size(Some((1024, 522)), ResizeMode::Fit, Some(128), Some(320)), (128, 320));
        // One side given: the other follows the photo's shape, or stays native.
        assert_eq!(TINY.output_size(Some((1024, 512)), ResizeMode::Fit, Some(512), None), (512, 256));
        assert_eq!(TINY.output_size(Some((1024, 512)), ResizeMode::Crop, None, Some(128)), (256, 128));
    }

    /// A photo whose left half is red and right half blue, under a green bar a tenth of it high.
    fn halves(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            if y < height / 10 {
                Rgb([0, 255, 0])
            } else if x < width / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn each_mode_fits_the_photo_its_own_way() {
        let photo = halves(200, 100);
        let square = |mode| shape_photo(&photo, mode, 64, 64);

        // crop: the centre of the photo, so both halves meet in the middle and the edges are cut.
        let crop = square(ResizeMode::Crop);
        assert!(crop.get_pixel(2, 32)[0] > 200 && crop.get_pixel(61, 32)[2] > 200);
        // stretch: the whole photo squeezed; the green bar is still there.
        let stretch = square(ResizeMode::Stretch);
        assert!(stretch.get_pixel(32, 0)[1] > 100, "{:?}", stretch.get_pixel(32, 0));
        // fill: the whole photo in the middle band, its edge rows extended above and below.
        let fill = square(ResizeMode::Fill);
        assert_eq!(fill.get_pixel(10, 0), fill.get_pixel(10, 15), "extended from the top edge");
        assert!(fill.get_pixel(10, 63)[0] > 200, "the bottom edge is red on the left");
        // fit at the photo's own shape: nothing to cut.
        let fit = shape_photo(&photo, ResizeMode::Fit, 128, 64);
        assert!(fit.get_pixel(64, 0)[1] > 100 && fit.get_pixel(1, 32)[0] > 200);
    }
}
