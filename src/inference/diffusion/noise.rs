//! Where a generation's Gaussian draws come from: the seeded stream in service, or draws recorded
//! from another implementation when a test replays its run.

use ndarray::{ArrayViewMut4, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A source of unit Gaussian noise, asked for one latent-shaped draw at a time (the initial noise,
/// then whatever the scheduler's steps draw).
pub trait NoiseSource: Send {
    /// Fills `out` with the next draw.
    fn fill(&mut self, out: ArrayViewMut4<'_, f32>);
}

/// `ChaCha8Rng::seed_from_u64(seed)` read as float32 standard normals in C order.
pub struct SeededNoise(ChaCha8Rng);

impl SeededNoise {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> SeededNoise {
        SeededNoise(ChaCha8Rng::seed_from_u64(seed))
    }
}

impl NoiseSource for SeededNoise {
    fn fill(&mut self, mut out: ArrayViewMut4<'_, f32>) {
        let rng = &mut self.0;
        out.iter_mut().for_each(|x| *x = rng.sample(StandardNormal));
    }
}

/// The draws of a batch of images, each row from its own seeded stream: image `i` of a batch from
/// `seed` draws exactly what a generation of one image from `seed + i` draws.
pub struct BatchNoise(Vec<SeededNoise>);

impl BatchNoise {
    /// `count` streams, of `seed`, `seed + 1`, …
    pub fn new(seed: u64, count: usize) -> BatchNoise {
        BatchNoise((0..count as u64).map(|i| SeededNoise::new(seed.wrapping_add(i))).collect())
    }
}

impl NoiseSource for BatchNoise {
    fn fill(&mut self, mut out: ArrayViewMut4<'_, f32>) {
        assert_eq!(out.dim().0, self.0.len(), "one row per stream");
        for (stream, row) in self.0.iter_mut().zip(out.axis_chunks_iter_mut(Axis(0), 1)) {
            stream.fill(row);
        }
    }
}
