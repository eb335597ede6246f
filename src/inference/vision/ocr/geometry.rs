//! The image geometry text reading needs, as OpenCV does it for PaddleOCR: bilinear resizing
//! (`cv2.resize`), the minimum-area rectangle around points (`cv2.minAreaRect`) and the crop of a
//! tilted quadrilateral (`cv2.warpPerspective` with bicubic sampling).

use image::{Rgb, RgbImage};

/// A point in pixels.
pub type Point = [f32; 2];

/// `cv2.resize` with `INTER_LINEAR`: pixel centres aligned, two taps a direction, no
/// anti-aliasing when shrinking, weights in OpenCV's 11-bit fixed point.
pub fn resize_linear(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    const ONE: i32 = 1 << 11;
    let taps = |dst: u32, src: u32| -> Vec<(usize, i32)> {
        let scale = f64::from(src) / f64::from(dst);
        (0..dst)
            .map(|d| {
                let f = (f64::from(d) + 0.5) * scale - 0.5;
                let mut s = f.floor();
                let mut frac = f - s;
                if s < 0.0 {
                    (s, frac) = (0.0, 0.0);
                }
                if s >= f64::from(src - 1) {
                    (s, frac) = (f64::from(src - 1), 0.0);
                }
                let w0 = ((1.0 - frac) * f64::from(ONE)).round() as i32;
                (s as usize, w0)
            })
            .collect()
    };
    let (src_w, src_h) = image.dimensions();
    let xs = taps(width, src_w);
    let raw = image.as_raw();
    let stride = src_w as usize * 3;
    let last_x = src_w as usize - 1;
    // Each source row is first resampled horizontally (the sums keep the 11-bit weights), then
    // pairs of rows are blended: OpenCV's two passes, in its fixed point.
    let horizontal = |y: usize, row: &mut Vec<i32>| {
        row.clear();
        let line = &raw[y * stride..(y + 1) * stride];
        for &(sx, wx) in &xs {
            let a = sx * 3;
            let b = if sx < last_x { a + 3 } else { a };
            for c in 0..3 {
                row.push(wx * i32::from(line[a + c]) + (ONE - wx) * i32::from(line[b + c]));
            }
        }
    };
    let mut out = vec![0u8; width as usize * height as usize * 3];
    let (mut top, mut bottom) = (Vec::new(), Vec::new());
    for (dy, &(sy, wy)) in taps(height, src_h).iter().enumerate() {
        horizontal(sy, &mut top);
        horizontal((sy + 1).min(src_h as usize - 1), &mut bottom);
        let dst = &mut out[dy * width as usize * 3..(dy + 1) * width as usize * 3];
        for ((value, &t), &b) in dst.iter_mut().zip(&top).zip(&bottom) {
            let sum = i64::from(wy) * i64::from(t) + i64::from(ONE - wy) * i64::from(b);
            *value = ((sum + (1 << 21)) >> 22).clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(width, height, out).expect("width × height × 3 bytes")
}

/// A rotated rectangle: its four corners, and the lengths of its sides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    /// Corners in order around the rectangle.
    pub corners: [Point; 4],
    /// Length of the side from corner 0 to corner 1.
    pub width: f32,
    /// Length of the side from corner 1 to corner 2.
    pub height: f32,
}

impl Rect {
    /// The shorter side.
    pub fn short_side(&self) -> f32 {
        self.width.min(self.height)
    }

    /// The same rectangle with every side moved out by `by`.
    pub fn grown(&self, by: f32) -> Rect {
        let centre = self.corners.iter().fold([0.0, 0.0], |c, p| [c[0] + p[0] / 4.0, c[1] + p[1] / 4.0]);
        let unit = |a: Point, b: Point, len: f32| {
            if len > 0.0 { [(b[0] - a[0]) / len, (b[1] - a[1]) / len] } else { [0.0, 0.0] }
        };
        let mut u = unit(self.corners[0], self.corners[1], self.width);
        let mut v = unit(self.corners[1], self.corners[2], self.height);
        if self.width == 0.0 {
            u = [v[1], -v[0]];
        }
        if self.height == 0.0 {
            v = [-u[1], u[0]];
        }
        let (hw, hh) = (self.width / 2.0 + by, self.height / 2.0 + by);
        let corner = |su: f32, sv: f32| {
            [centre[0] + su * hw * u[0] + sv * hh * v[0], centre[1] + su * hw * u[1] + sv * hh * v[1]]
        };
        Rect {
            corners: [corner(-1.0, -1.0), corner(1.0, -1.0), corner(1.0, 1.0), corner(-1.0, 1.0)],
            width: 2.0 * hw,
            height: 2.0 * hh,
        }
    }

    /// Area over perimeter.
    pub fn area_per_length(&self) -> f32 {
        let perimeter = 2.0 * (self.width + self.height);
        if perimeter > 0.0 { self.width * self.height / perimeter } else { 0.0 }
    }
}

/// The convex hull of `points`, counter-clockwise in image coordinates (Andrew's monotone chain).
pub fn convex_hull(points: &mut [Point]) -> Vec<Point> {
    points.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    let cross = |o: Point, a: Point, b: Point| (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
    let mut hull: Vec<Point> = Vec::with_capacity(points.len() + 1);
    for pass in 0..2 {
        let start = hull.len();
        let ordered: Box<dyn Iterator<Item = &Point>> =
            if pass == 0 { Box::new(points.iter()) } else { Box::new(points.iter().rev()) };
        for &p in ordered {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    hull.dedup();
    if hull.is_empty() {
        hull.extend(points.first());
    }
    hull
}

/// The smallest-area rectangle holding `points`, by rotating calipers over their hull.
pub fn min_area_rect(points: &mut [Point]) -> Rect {
    let hull = convex_hull(points);
    if hull.len() == 1 {
        return Rect { corners: [hull[0]; 4], width: 0.0, height: 0.0 };
    }
    let mut best: Option<(f32, Rect)> = None;
    for i in 0..hull.len() {
        let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
        let len = ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
        if len == 0.0 {
            continue;
        }
        let u = [(b[0] - a[0]) / len, (b[1] - a[1]) / len];
        let v = [-u[1], u[0]];
        let (mut u_min, mut u_max, mut v_min, mut v_max) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for p in &hull {
            let (pu, pv) = (p[0] * u[0] + p[1] * u[1], p[0] * v[0] + p[1] * v[1]);
            (u_min, u_max, v_min, v_max) = (u_min.min(pu), u_max.max(pu), v_min.min(pv), v_max.max(pv));
        }
        let area = (u_max - u_min) * (v_max - v_min);
        if best.as_ref().is_none_or(|(a, _)| area < *a) {
            let at = |pu: f32, pv: f32| [pu * u[0] + pv * v[0], pu * u[1] + pv * v[1]];
            let corners = [at(u_min, v_min), at(u_max, v_min), at(u_max, v_max), at(u_min, v_max)];
            best = Some((area, Rect { corners, width: u_max - u_min, height: v_max - v_min }));
        }
    }
    best.map(|(_, rect)| rect).expect("a hull of two or more points has an edge")
}

/// PaddleOCR's corner order for a box: the two leftmost corners (by x) give the top-left and
/// bottom-left by y, the two rightmost the top-right and bottom-right; returned as
/// `[top-left, top-right, bottom-right, bottom-left]`.
pub fn order_corners(corners: [Point; 4]) -> [Point; 4] {
    let mut by_x = corners;
    by_x.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let (l0, l1) = if by_x[1][1] > by_x[0][1] { (by_x[0], by_x[1]) } else { (by_x[1], by_x[0]) };
    let (r0, r1) = if by_x[3][1] > by_x[2][1] { (by_x[2], by_x[3]) } else { (by_x[3], by_x[2]) };
    [l0, r0, r1, l1]
}

/// The distance between two points.
pub fn distance(a: Point, b: Point) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

/// The quadrilateral `corners` (top-left, top-right, bottom-right, bottom-left) of `image`,
/// straightened into a `width` × `height` image: `cv2.warpPerspective` with bicubic sampling and
/// the border replicated.
pub fn warp_quad(image: &RgbImage, corners: [Point; 4], width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as f32, height as f32);
    let target = [[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]];
    let map = homography(target, corners);
    let (src_w, src_h) = (image.width() as i64, image.height() as i64);
    let pixel = |x: i64, y: i64, c: usize| {
        f32::from(image.get_pixel(x.clamp(0, src_w - 1) as u32, y.clamp(0, src_h - 1) as u32)[c])
    };
    let mut out = RgbImage::new(width, height);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f64, y as f64);
            let d = map[6] * fx + map[7] * fy + map[8];
            let sx = ((map[0] * fx + map[1] * fy + map[2]) / d) as f32;
            let sy = ((map[3] * fx + map[4] * fy + map[5]) / d) as f32;
            let (ix, iy) = (sx.floor(), sy.floor());
            let (wx, wy) = (cubic_weights(sx - ix), cubic_weights(sy - iy));
            let mut value = [0u8; 3];
            for (c, v) in value.iter_mut().enumerate() {
                let mut sum = 0.0;
                for (j, wy) in wy.iter().enumerate() {
                    for (i, wx) in wx.iter().enumerate() {
                        sum += wy * wx * pixel(ix as i64 + i as i64 - 1, iy as i64 + j as i64 - 1, c);
                    }
                }
                *v = sum.round().clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(x, y, Rgb(value));
        }
    }
    out
}

/// OpenCV's bicubic weights (a = -0.75) for the four taps around a fractional offset.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let w2 = ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

/// The projective map taking each `from` point to its `to` point, row-major 3×3 with the last
/// entry 1 (`cv2.getPerspectiveTransform`).
fn homography(from: [Point; 4], to: [Point; 4]) -> [f64; 9] {
    let mut m = [[0f64; 9]; 8];
    for k in 0..4 {
        let (x, y) = (f64::from(from[k][0]), f64::from(from[k][1]));
        let (u, v) = (f64::from(to[k][0]), f64::from(to[k][1]));
        m[2 * k] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        m[2 * k + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs())).expect("rows");
        m.swap(col, pivot);
        let p = m[col][col];
        if p == 0.0 {
            continue;
        }
        m[col].iter_mut().skip(col).for_each(|v| *v /= p);
        let pivot_row = m[col];
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col];
                row.iter_mut().zip(pivot_row).skip(col).for_each(|(v, p)| *v -= f * p);
            }
        }
    }
    let h: Vec<f64> = (0..8).map(|i| m[i][8]).collect();
    [h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], 1.0]
}

/// `np.rot90`: a quarter turn counter-clockwise.
pub fn rotate_left(image: &RgbImage) -> RgbImage {
    image::imageops::rotate270(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rectangle_around_a_tilted_bar_has_its_sides() {
        let mut points: Vec<Point> = (0..=10)
            .flat_map(|i| [[i as f32 * 3.0, i as f32], [i as f32 * 3.0 - 1.0, i as f32 + 3.0]])
            .collect();
        let rect = min_area_rect(&mut points);
        let long = rect.width.max(rect.height);
        assert!((long - (30f32.powi(2) + 10f32.powi(2)).sqrt()).abs() < 1.5, "{rect:?}");
        assert!(rect.short_side() < 3.5 && rect.short_side() > 2.0, "{rect:?}");
    }

    #[test]
    fn an_upright_crop_is_the_pixels_themselves() {
        let image = RgbImage::from_fn(20, 10, |x, y| Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let crop = warp_quad(&image, [[4.0, 2.0], [12.0, 2.0], [12.0, 7.0], [4.0, 7.0]], 8, 5);
        for (x, y, p) in crop.enumerate_pixels() {
            assert_eq!(*p, *image.get_pixel(x + 4, y + 2));
        }
    }

    #[test]
    fn linear_resize_keeps_flat_colour_and_halves_like_opencv() {
        let flat = RgbImage::from_pixel(7, 5, Rgb([90, 120, 200]));
        assert!(resize_linear(&flat, 13, 3).pixels().all(|p| *p == Rgb([90, 120, 200])));
        let ramp = RgbImage::from_fn(4, 1, |x, _| Rgb([[0, 100, 200, 250][x as usize], 0, 0]));
        // Halving samples between pixels 0 and 1, and 2 and 3: (0 + 100) / 2 and (200 + 250) / 2.
        let half = resize_linear(&ramp, 2, 1);
        assert_eq!([half.get_pixel(0, 0)[0], half.get_pixel(1, 0)[0]], [50, 225]);
    }

    #[test]
    fn corners_are_ordered_from_the_top_left_clockwise() {
        let ordered = order_corners([[10.0, 8.0], [0.0, 0.0], [0.0, 8.0], [10.0, 0.0]]);
        assert_eq!(ordered, [[0.0, 0.0], [10.0, 0.0], [10.0, 8.0], [0.0, 8.0]]);
    }
}
