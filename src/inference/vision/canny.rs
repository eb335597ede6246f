//! Canny edge maps, the control images of ControlNet's "canny" models.
//!
//! diffusers' examples and controlnet_aux make them with `cv2.Canny(rgb, low, high)` on the
//! 8-bit RGB photo and stack the one-channel map into three channels. [`canny`] follows OpenCV's
//! `cv::Canny` (imgproc/src/canny.cpp) with its defaults, aperture 3 and `L2gradient=false`, so
//! the maps match the ones the models were trained on:
//!
//! - 3×3 Sobel derivatives with `BORDER_REPLICATE`, exact in integers;
//! - L1 magnitude `|dx| + |dy|`; in colour, each pixel takes dx, dy and magnitude from its
//!   channel with the largest magnitude (the first such channel on ties);
//! - non-maximum suppression with OpenCV's fixed-point tangent test, including its asymmetric
//!   ties (a pixel must beat the neighbour before it and at least equal the one after it);
//!   outside the image the magnitude counts as 0, so border pixels can be edges;
//! - thresholds swapped when `low > high`, then floored; a pixel is a candidate when its
//!   magnitude is `> low` and strong when `> high`;
//! - hysteresis: candidates 8-connected to a strong pixel become edges.

use image::{GrayImage, Luma, Rgb, RgbImage};

/// tan(22.5°) in OpenCV's Q15 fixed point: `(0.41421356 * 2^15 + 0.5) as i32`.
const TAN_22_5_Q15: i32 = 13573;
/// OpenCV's fixed-point shift for the tangent test.
const TANGENT_SHIFT: u32 = 15;

/// The value of an edge pixel in the maps; all others are 0.
const EDGE: u8 = 255;

/// A pixel's state after non-maximum suppression and thresholding.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Suppressed or at most the low threshold.
    Rejected,
    /// A local maximum above the low threshold: an edge if connected to a strong one.
    Candidate,
    /// An edge (strong, or reached from a strong pixel by hysteresis).
    Edge,
}

/// Per-pixel Sobel derivatives and L1 magnitude of the strongest channel, row-major.
struct Gradients {
    width: usize,
    height: usize,
    dx: Vec<i32>,
    dy: Vec<i32>,
    magnitude: Vec<i32>,
}

impl Gradients {
    /// 3×3 Sobel with replicated borders on each channel, keeping the channel with the largest
    /// `|dx| + |dy|` (the first one on ties, as OpenCV's strict `>` does).
    fn of(image: &RgbImage) -> Gradients {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let raw = image.as_raw();
        let at = |x: usize, y: usize, c: usize| i32::from(raw[(y * width + x) * 3 + c]);
        let len = width * height;
        let mut gradients =
            Gradients { width, height, dx: vec![0; len], dy: vec![0; len], magnitude: vec![0; len] };
        for y in 0..height {
            let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
            for x in 0..width {
                let (left, right) = (x.saturating_sub(1), (x + 1).min(width - 1));
                let (mut best_dx, mut best_dy, mut best) = (0, 0, -1);
                for c in 0..3 {
                    let dx = at(right, up, c) - at(left, up, c)
                        + 2 * (at(right, y, c) - at(left, y, c))
                        + at(right, down, c)
                        - at(left, down, c);
                    let dy = at(left, down, c) - at(left, up, c)
                        + 2 * (at(x, down, c) - at(x, up, c))
                        + at(right, down, c)
                        - at(right, up, c);
                    let magnitude = dx.abs() + dy.abs();
                    if magnitude > best {
                        (best_dx, best_dy, best) = (dx, dy, magnitude);
                    }
                }
                let i = y * width + x;
                (gradients.dx[i], gradients.dy[i], gradients.magnitude[i]) = (best_dx, best_dy, best);
            }
        }
        gradients
    }

    /// The magnitude at `(x + dx, y + dy)`, 0 outside the image.
    fn magnitude_at(&self, x: usize, y: usize, dx: isize, dy: isize) -> i32 {
        match (x.checked_add_signed(dx), y.checked_add_signed(dy)) {
            (Some(x), Some(y)) if x < self.width && y < self.height => self.magnitude[y * self.width + x],
            _ => 0,
        }
    }

    /// Whether the pixel is a local maximum across the edge, by OpenCV's rules: the gradient
    /// direction is binned to horizontal, vertical or one diagonal with the Q15 tangent of 22.5°
    /// and 67.5°; along it the pixel must exceed the neighbour before and, except on diagonals
    /// (which are strict both ways), at least equal the one after.
    fn is_local_maximum(&self, x: usize, y: usize) -> bool {
        let i = y * self.width + x;
        let m = self.magnitude[i];
        let (xs, ys) = (self.dx[i], self.dy[i]);
        let ax = xs.abs();
        let ay = ys.abs() << TANGENT_SHIFT;
        let tan22 = ax * TAN_22_5_Q15;
        // tan(67.5°) = tan(22.5°) + 2
        let tan67 = tan22 + (ax << (TANGENT_SHIFT + 1));
        let at = |dx, dy| self.magnitude_at(x, y, dx, dy);
        if ay < tan22 {
            m > at(-1, 0) && m >= at(1, 0)
        } else if ay > tan67 {
            m > at(0, -1) && m >= at(0, 1)
        } else {
            // gradients with the same sign point down-right (y grows downwards): compare the
            // up-left and down-right neighbours, else up-right and down-left
            let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
            m > at(-s, -1) && m > at(s, 1)
        }
    }
}

/// OpenCV's integer thresholds: swapped when `low > high`, then floored.
fn integer_thresholds(low_threshold: f32, high_threshold: f32) -> (i32, i32) {
    let (low, high) = if low_threshold > high_threshold {
        (high_threshold, low_threshold)
    } else {
        (low_threshold, high_threshold)
    };
    // `as` saturates (and maps NaN to 0), where OpenCV's cvFloor would be undefined
    (low.floor() as i32, high.floor() as i32)
}

/// Canny edges of an 8-bit RGB image as OpenCV's `cv2.Canny(image, low, high)` computes them
/// (aperture 3, L1 gradient): 255 on edges, 0 elsewhere, the same size as `image`.
pub fn canny(image: &RgbImage, low_threshold: f32, high_threshold: f32) -> GrayImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return GrayImage::new(width, height);
    }
    let (low, high) = integer_thresholds(low_threshold, high_threshold);
    let gradients = Gradients::of(image);
    let mut marks = vec![Mark::Rejected; gradients.magnitude.len()];
    let mut strong = Vec::new();
    for y in 0..gradients.height {
        for x in 0..gradients.width {
            let i = y * gradients.width + x;
            let m = gradients.magnitude[i];
            if m > low && gradients.is_local_maximum(x, y) {
                if m > high {
                    marks[i] = Mark::Edge;
                    strong.push(i);
                } else {
                    marks[i] = Mark::Candidate;
                }
            }
        }
    }
    grow_edges(&mut marks, strong, gradients.width);
    GrayImage::from_fn(width, height, |x, y| {
        let edge = marks[y as usize * gradients.width + x as usize] == Mark::Edge;
        Luma([if edge { EDGE } else { 0 }])
    })
}

/// Hysteresis: every candidate 8-connected to an edge pixel becomes an edge.
fn grow_edges(marks: &mut [Mark], mut stack: Vec<usize>, width: usize) {
    let height = marks.len() / width;
    while let Some(i) = stack.pop() {
        let (x, y) = (i % width, i / width);
        for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                let n = ny * width + nx;
                if marks[n] == Mark::Candidate {
                    marks[n] = Mark::Edge;
                    stack.push(n);
                }
            }
        }
    }
}

/// The ControlNet "canny" control image: [`canny`]'s map in all three channels, as diffusers'
/// examples stack it (`np.concatenate([edges] * 3, axis=2)`).
pub fn canny_control(image: &RgbImage, low_threshold: f32, high_threshold: f32) -> RgbImage {
    let edges = canny(image, low_threshold, high_threshold);
    RgbImage::from_fn(edges.width(), edges.height(), |x, y| {
        let Luma([value]) = *edges.get_pixel(x, y);
        Rgb([value; 3])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A black 32×32 image with a white square over `10..22` in both directions.
    fn square() -> RgbImage {
        RgbImage::from_fn(32, 32, |x, y| {
            if (10..22).contains(&x) && (10..22).contains(&y) { Rgb([255; 3]) } else { Rgb([0; 3]) }
        })
    }

    fn is_edge(edges: &GrayImage, x: u32, y: u32) -> bool {
        edges.get_pixel(x, y).0[0] == EDGE
    }

    #[test]
    fn a_square_gives_a_closed_ring_of_edges_around_it() {
        let edges = canny(&square(), 100.0, 200.0);
        let count = edges.pixels().filter(|p| p.0[0] == EDGE).count();
        assert!(count >= 4 * 11, "too few edge pixels: {count}");
        // every edge lies on the square's outline, give or take a pixel
        for (x, y, p) in edges.enumerate_pixels() {
            let near = |v: u32| (9..=10).contains(&v) || (21..=22).contains(&v);
            let inside = |v: u32| (9..=22).contains(&v);
            if p.0[0] == EDGE {
                assert!((near(x) && inside(y)) || (near(y) && inside(x)), "stray edge at {x},{y}");
            }
        }
        // closed: filling from the centre through non-edges never reaches the image border
        let mut seen = vec![false; 32 * 32];
        let mut stack = vec![(16u32, 16u32)];
        while let Some((x, y)) = stack.pop() {
            if is_edge(&edges, x, y) || std::mem::replace(&mut seen[(y * 32 + x) as usize], true) {
                continue;
            }
            assert!(x > 0 && y > 0 && x < 31 && y < 31, "the ring leaks at {x},{y}");
            stack.extend([(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]);
        }
    }

    #[test]
    fn swapped_thresholds_give_the_same_map() {
        let image = square();
        assert_eq!(canny(&image, 200.0, 100.0), canny(&image, 100.0, 200.0));
        assert_eq!(canny(&image, 900.0, 30.0), canny(&image, 30.0, 900.0));
    }

    #[test]
    fn a_flat_image_has_no_edges() {
        let edges = canny(&RgbImage::from_pixel(24, 16, Rgb([90, 140, 200])), 0.0, 0.0);
        assert!(edges.pixels().all(|p| p.0[0] == 0));
    }

    #[test]
    fn thresholds_are_floored_and_strict_and_ties_go_to_the_left_pixel() {
        // a vertical step of 50: Sobel gives |dx| = 200 on both columns beside it
        let step = RgbImage::from_fn(16, 8, |x, _| if x < 8 { Rgb([0; 3]) } else { Rgb([50; 3]) });
        assert!(canny(&step, 100.0, 200.0).pixels().all(|p| p.0[0] == 0), "200 is not > 200");
        let edges = canny(&step, 100.0, 199.9);
        for (x, y, p) in edges.enumerate_pixels() {
            assert_eq!(p.0[0] == EDGE, x == 7, "pixel {x},{y}");
        }
    }

    #[test]
    fn the_control_image_repeats_the_map_in_three_channels() {
        let image = square();
        let edges = canny(&image, 100.0, 200.0);
        let control = canny_control(&image, 100.0, 200.0);
        assert_eq!(control.dimensions(), edges.dimensions());
        for (x, y, p) in control.enumerate_pixels() {
            assert_eq!(p.0, [edges.get_pixel(x, y).0[0]; 3]);
        }
    }

    #[test]
    fn an_empty_image_gives_an_empty_map() {
        assert_eq!(canny(&RgbImage::new(0, 5), 100.0, 200.0).dimensions(), (0, 5));
    }
}
