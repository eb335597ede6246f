//! Differentiable Binarization post-processing (PaddleOCR's `DBPostProcess`, "fast" scoring):
//! the text-probability map becomes boxes of text lines.
//!
//! The map is binarised and dilated by a 2 × 2 square; each 8-connected region gets its
//! minimum-area rectangle, kept if its mean probability reaches the box threshold, then grown
//! ("unclipped") by area × ratio / perimeter on every side, as the network was trained to predict
//! shrunken regions. PaddleOCR walks the regions' outer and hole contours (`cv2.findContours`);
//! only outer borders are taken here: a hole inside a text region is a gap between strokes, whose
//! box would lie inside its region's box.

use super::geometry::{Point, Rect, min_area_rect, order_corners};

/// The post-processing thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbSettings {
    /// Probability above which a pixel is text.
    pub threshold: f32,
    /// Mean probability a region's box needs.
    pub box_threshold: f32,
    /// Most regions looked at.
    pub max_candidates: usize,
    /// How far boxes grow: area × this / perimeter.
    pub unclip_ratio: f32,
}

impl Default for DbSettings {
    fn default() -> Self {
        DbSettings { threshold: 0.3, box_threshold: 0.5, max_candidates: 1000, unclip_ratio: 1.6 }
    }
}

/// Regions whose rectangle is thinner than this (in map pixels) are noise.
const MIN_SIZE: f32 = 3.0;

/// The probability map (`width` × `height`, row-major) as boxes in a `dest` = (width, height)
/// image, each `[top-left, top-right, bottom-right, bottom-left]` in whole pixels, with the box's
/// mean probability.
pub fn boxes(
    map: &[f32],
    width: usize,
    height: usize,
    dest: (u32, u32),
    settings: &DbSettings,
) -> Vec<([Point; 4], f32)> {
    let text: Vec<bool> = map.iter().map(|&p| p > settings.threshold).collect();
    let dilated = dilate(&text, width, height);
    let mut found = Vec::new();
    for mut points in regions(&dilated, width, height).into_iter().take(settings.max_candidates) {
        let rect = min_area_rect(&mut points);
        if rect.short_side() < MIN_SIZE {
            continue;
        }
        let corners = order_corners(rect.corners);
        let score = mean_inside(map, width, height, &corners);
        if score < settings.box_threshold {
            continue;
        }
        let grown = unclip(&rect, settings.unclip_ratio);
        if grown.short_side() < MIN_SIZE + 2.0 {
            continue;
        }
        let scale = |p: Point| {
            [
                (p[0] / width as f32 * dest.0 as f32).round_ties_even().clamp(0.0, dest.0 as f32),
                (p[1] / height as f32 * dest.1 as f32).round_ties_even().clamp(0.0, dest.1 as f32),
            ]
        };
        found.push((order_corners(grown.corners).map(scale), score));
    }
    found
}

/// `cv2.dilate` with a 2 × 2 kernel anchored at its centre: a pixel is set if it or its left,
/// upper or upper-left neighbour is.
fn dilate(bits: &[bool], width: usize, height: usize) -> Vec<bool> {
    // Rows first (a pixel or its left neighbour), then columns (a row or the one above).
    let mut rows = bits.to_vec();
    for (row, source) in rows.chunks_exact_mut(width).zip(bits.chunks_exact(width)) {
        for x in 1..width {
            row[x] |= source[x - 1];
        }
    }
    let mut out = rows.clone();
    for y in 1..height {
        let above = &rows[(y - 1) * width..y * width];
        for (pixel, &up) in out[y * width..(y + 1) * width].iter_mut().zip(above) {
            *pixel |= up;
        }
    }
    out
}

/// The 8-connected regions of set pixels, in the order of their first pixel (row-major), each as
/// the pixel centres that bound it: per row, its leftmost and rightmost pixel.
fn regions(bits: &[bool], width: usize, height: usize) -> Vec<Vec<Point>> {
    let mut label = vec![usize::MAX; bits.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..bits.len() {
        if !bits[start] || label[start] != usize::MAX {
            continue;
        }
        let id = out.len();
        let mut rows: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        label[start] = id;
        stack.push(start);
        while let Some(at) = stack.pop() {
            let (x, y) = (at % width, at / width);
            let span = rows.entry(y).or_insert((x, x));
            *span = (span.0.min(x), span.1.max(x));
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let n = ny * width + nx;
                    if bits[n] && label[n] == usize::MAX {
                        label[n] = id;
                        stack.push(n);
                    }
                }
            }
        }
        out.push(
            rows.into_iter()
                .flat_map(|(y, (x0, x1))| [[x0 as f32, y as f32], [x1 as f32, y as f32]])
                .collect(),
        );
    }
    out
}

/// The mean of the map inside the polygon, over the pixels of its bounding box (PaddleOCR's
/// `box_score_fast`: the corners cut to whole pixels, the polygon filled edges included).
fn mean_inside(map: &[f32], width: usize, height: usize, corners: &[Point; 4]) -> f32 {
    let clampi = |v: f32, hi: usize| (v as i64).clamp(0, hi as i64 - 1) as usize;
    let x_min = clampi(corners.iter().map(|p| p[0]).fold(f32::MAX, f32::min).floor(), width);
    let x_max = clampi(corners.iter().map(|p| p[0]).fold(f32::MIN, f32::max).ceil(), width);
    let y_min = clampi(corners.iter().map(|p| p[1]).fold(f32::MAX, f32::min).floor(), height);
    let y_max = clampi(corners.iter().map(|p| p[1]).fold(f32::MIN, f32::max).ceil(), height);
    let poly: Vec<Point> =
        corners.iter().map(|p| [(p[0] - x_min as f32).trunc(), (p[1] - y_min as f32).trunc()]).collect();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for row in 0..=(y_max - y_min) {
        let Some((left, right)) = span_at(&poly, row as f32) else { continue };
        let from = left.max(0.0) as usize;
        let to = (right.min((x_max - x_min) as f32)) as usize;
        for col in from..=to.max(from) {
            if (col as f32) > right {
                break;
            }
            sum += f64::from(map[(y_min + row) * width + x_min + col]);
            count += 1;
        }
    }
    if count == 0 { 0.0 } else { (sum / count as f64) as f32 }
}

/// Where the horizontal line at `y` enters and leaves the convex polygon, in whole pixels.
fn span_at(poly: &[Point], y: f32) -> Option<(f32, f32)> {
    let (mut left, mut right) = (f32::MAX, f32::MIN);
    for i in 0..poly.len() {
        let (a, b) = (poly[i], poly[(i + 1) % poly.len()]);
        let (lo, hi) = (a[1].min(b[1]), a[1].max(b[1]));
        if y < lo || y > hi {
            continue;
        }
        let xs = if a[1] == b[1] {
            [a[0], b[0]]
        } else {
            let x = a[0] + (y - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            [x, x]
        };
        for x in xs {
            (left, right) = (left.min(x), right.max(x));
        }
    }
    (left <= right).then(|| ((left - 1e-3).ceil(), (right + 1e-3).floor()))
}

/// PaddleOCR's `unclip`: the rectangle (its corners cut to whole pixels, as Clipper takes them)
/// grown by area × `ratio` / perimeter on every side; Clipper's rounded corners lie inside the
/// grown rectangle, so its minimum-area rectangle is that.
fn unclip(rect: &Rect, ratio: f32) -> Rect {
    let distance = rect.area_per_length() * ratio;
    let mut whole: Vec<Point> = rect.corners.iter().map(|p| [p[0].trunc(), p[1].trunc()]).collect();
    min_area_rect(&mut whole).grown(distance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bright_bar_becomes_one_box_grown_around_it() {
        let (w, h) = (64, 32);
        let mut map = vec![0.0f32; w * h];
        for y in 10..16 {
            for x in 8..48 {
                map[y * w + x] = 0.9;
            }
        }
        let found = boxes(&map, w, h, (128, 64), &DbSettings::default());
        assert_eq!(found.len(), 1, "{found:?}");
        let (corners, score) = found[0];
        // The dilated row and column score 0: 0.9 × 240 / 287 pixels.
        assert!((score - 0.9 * 240.0 / 287.0).abs() < 0.01, "{score}");
        // Dilated by a pixel, the centres span 40 x 6 (x 8..=48, y 10..=16); that grows by
        // 240 * 1.6 / 92 = 4.2 a side, and the map is half the image's size.
        let [tl, _, br, _] = corners;
        assert!((tl[0] - 8.0).abs() <= 1.0 && (tl[1] - 12.0).abs() <= 1.0, "{corners:?}");
        assert!((br[0] - 104.0).abs() <= 1.0 && (br[1] - 40.0).abs() <= 1.0, "{corners:?}");
    }

    #[test]
    fn faint_and_tiny_regions_are_dropped() {
        let (w, h) = (32, 32);
        let mut map = vec![0.0f32; w * h];
        for y in 2..8 {
            for x in 2..20 {
                map[y * w + x] = 0.35;
            }
        }
        map[20 * w + 20] = 0.99;
        assert!(boxes(&map, w, h, (32, 32), &DbSettings::default()).is_empty());
    }
}
