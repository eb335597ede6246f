//! Replays Gaussian draws recorded from the Python reference, in the order the pipeline asks for
//! them: the initial noise first, then each scheduler step's fresh noise.

use std::collections::VecDeque;

use deskgen::inference::diffusion::NoiseSource;
use ndarray::{Array4, ArrayViewMut4};

/// Recorded draws; asking for one more than recorded, or of another shape, fails the test.
pub struct Draws(VecDeque<Array4<f32>>);

impl Draws {
    /// No draws at all: for stepping a deterministic scheduler by itself.
    pub fn none() -> Draws {
        Draws(VecDeque::new())
    }

    /// The initial noise alone (the deterministic schedulers draw nothing else).
    pub fn initial(noise: Array4<f32>) -> Draws {
        Draws(VecDeque::from([noise]))
    }

    /// The initial noise, then `steps` `[S, 1, C, h, w]`, one draw per step.
    pub fn with_steps(noise: Array4<f32>, steps: &ndarray::ArrayD<f32>) -> Draws {
        let mut draws = VecDeque::from([noise]);
        for step in steps.outer_iter() {
            draws.push_back(step.to_owned().into_dimensionality().expect("a [1, C, h, w] draw"));
        }
        Draws(draws)
    }

    /// How many recorded draws the generation left unused.
    pub fn left(&self) -> usize {
        self.0.len()
    }
}

impl NoiseSource for Draws {
    fn fill(&mut self, mut out: ArrayViewMut4<'_, f32>) {
        let draw = self.0.pop_front().expect("the pipeline drew more noise than the reference did");
        assert_eq!(draw.dim(), out.dim(), "a draw of another shape than the reference's");
        out.assign(&draw);
    }
}
