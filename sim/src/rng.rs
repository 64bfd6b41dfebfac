//! The simulator's own seeded random numbers (SplitMix64): workloads and fault schedules draw
//! from it so a seed fixes them, independently of the entropy hook.

/// A small, fast, seedable generator.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponentially distributed with the given mean (inter-arrival times of a Poisson process).
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Pareto distributed with minimum `scale` and tail index `shape` (heavy-tailed session
    /// lengths), capped at `cap`.
    pub fn pareto(&mut self, scale: f64, shape: f64, cap: f64) -> f64 {
        let u = 1.0 - self.unit();
        (scale / u.powf(1.0 / shape)).min(cap)
    }

    /// A derived generator, so adding draws to one part of a run does not shift another.
    pub fn fork(&mut self, stream: u64) -> SimRng {
        SimRng(self.next_u64() ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn distributions_have_the_right_means() {
        let mut rng = SimRng::new(1);
        let n = 100_000;
        let mean_exp: f64 = (0..n).map(|_| rng.exponential(2.0)).sum::<f64>() / n as f64;
        assert!((mean_exp - 2.0).abs() < 0.05, "{mean_exp}");
        // Pareto(scale 1, shape 3) has mean 1.5.
        let mean_pareto: f64 =
            (0..n).map(|_| rng.pareto(1.0, 3.0, f64::MAX)).sum::<f64>() / n as f64;
        assert!((mean_pareto - 1.5).abs() < 0.05, "{mean_pareto}");
        assert!((0..1000).all(|_| rng.pareto(1.0, 1.1, 50.0) <= 50.0));
        let unit_ok = (0..1000)
            .map(|_| rng.unit())
            .all(|u| (0.0..1.0).contains(&u));
        assert!(unit_ok);
    }
}
