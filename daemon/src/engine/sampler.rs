//! Choosing the next token from a row of logits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen. `temperature == 0` means greedy (argmax).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy; otherwise logits are divided by it before softmax. At most 2.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Same seed, same model, same prompt: same output.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// The highest temperature accepted (as OpenAI's API).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Temperatures below this sample greedily.
const MIN_SAMPLING_TEMPERATURE: f32 = 1e-4;

/// A sampling value out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be between 0 and {MAX_TEMPERATURE}, got {0}")]
    Temperature(f32),
    #[error("top_p must be greater than 0 and at most 1, got {0}")]
    TopP(f32),
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }

    /// Rejects values no sampler can honour (NaN counts as out of range).
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // Below this, dividing by the temperature overflows and the distribution is a
        // spike on the argmax anyway.
        self.temperature < MIN_SAMPLING_TEMPERATURE || self.top_k == 1
    }
}

/// Per-sequence sampler: the parameters, the random stream, and scratch space reused for
/// every token so sampling does not allocate on the hot path.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
}

/// How many candidates the nucleus search looks at first; most distributions are covered
/// by far fewer, and widening is exact, so this only saves a full sort of the vocabulary.
const FIRST_NUCLEUS_WINDOW: usize = 64;

impl Sampler {
    /// `params` must have passed [`SamplingParams::validate`].
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token id from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_allowed(logits, |_| true)
            .unwrap_or_else(|| argmax(logits))
    }

    /// Picks the next token id among those `allowed` says yes to (a constraint's mask);
    /// `None` when it allows none.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        allowed: impl Fn(usize) -> bool,
    ) -> Option<u32> {
        if self.params.is_greedy() {
            return argmax_allowed(logits, allowed);
        }
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(i, l)| !l.is_nan() && allowed(i))
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if self.candidates.is_empty() {
            return None;
        }
        let top_k = self.params.top_k as usize;
        if top_k > 0 && top_k < self.candidates.len() {
            keep_largest(&mut self.candidates, top_k);
        }
        // Softmax over the kept candidates, in place.
        let max = self
            .candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for c in &mut self.candidates {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        if !total.is_finite() || total <= 0.0 {
            // Infinite logits leave no usable distribution; the most likely token is the
            // only honest answer.
            return argmax_allowed(logits, &allowed);
        }
        if self.params.top_p < 1.0 {
            total = self.keep_nucleus(total);
        }
        let mut target = self.rng.random::<f32>() * total;
        for &(id, weight) in &self.candidates {
            if target < weight {
                return Some(id);
            }
            target -= weight;
        }
        // Rounding can leave `target` a hair above the last weight.
        self.candidates.last().map(|c| c.0)
    }

    /// Keeps the most likely candidates whose mass reaches `top_p` of `total`; returns the
    /// kept mass. Looks at a small window first and widens only when it falls short.
    fn keep_nucleus(&mut self, total: f32) -> f32 {
        let goal = self.params.top_p * total;
        let mut window = FIRST_NUCLEUS_WINDOW.min(self.candidates.len());
        loop {
            keep_largest_unsorted_tail(&mut self.candidates, window);
            self.candidates[..window].sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut mass = 0.0;
            for (i, c) in self.candidates[..window].iter().enumerate() {
                mass += c.1;
                if mass >= goal {
                    self.candidates.truncate(i + 1);
                    return mass;
                }
            }
            if window == self.candidates.len() {
                return mass;
            }
            window = (window * 8).min(self.candidates.len());
        }
    }
}

/// Index of the largest logit; NaN never wins; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Index of the largest logit among the allowed ids; NaN never wins; ties go to the lowest
/// id. `None` when nothing is allowed.
pub fn argmax_allowed(logits: &[f32], allowed: impl Fn(usize) -> bool) -> Option<u32> {
    let mut best = None;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if (best.is_none() || v > best_value) && !v.is_nan() && allowed(i) {
            best = Some(i as u32);
            best_value = v;
        }
    }
    best
}

/// Keeps the `k` largest candidates (in any order).
fn keep_largest(candidates: &mut Vec<(u32, f32)>, k: usize) {
    candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    candidates.truncate(k);
}

/// Moves the `k` largest candidates to the front without dropping the rest.
fn keep_largest_unsorted_tail(candidates: &mut [(u32, f32)], k: usize) {
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_ignores_nan() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, f32::NAN, 3.0, 2.9]), 2);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, 0, seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_the_choice() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(params(1.0, 1.0, 1, 1));
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // Tokens 1 and 2 carry almost all the mass; with top_p 0.5 only token 1 remains.
        let mut s = Sampler::new(params(1.0, 0.5, 0, 3));
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        let mut s = Sampler::new(params(1.0, 0.99, 0, 3));
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.contains(&1) && picks.contains(&2));
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
    }

    #[test]
    fn top_k_limits_the_choice_to_the_k_most_likely() {
        let logits = [3.0, 0.0, 2.9, 2.8, -1.0];
        let mut s = Sampler::new(params(2.0, 1.0, 3, 9));
        let picks: Vec<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|p| [0, 2, 3].contains(p)), "{picks:?}");
        assert!([0, 2, 3].iter().all(|k| picks.contains(k)));
    }

    #[test]
    fn tiny_temperatures_and_infinite_logits_stay_sane() {
        let logits = [0.5, 1.5, 1.0];
        let mut s = Sampler::new(params(1e-30, 1.0, 0, 1));
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(params(1.0, 1.0, 0, 1));
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]), 1);
    }

    #[test]
    fn nucleus_widens_past_the_first_window() {
        // A flat distribution over 1000 tokens: top_p 0.9 needs 900 of them.
        let logits = vec![1.0f32; 1000];
        let mut s = Sampler::new(params(1.0, 0.9, 0, 5));
        let _ = s.sample(&logits);
        assert!(s.candidates.len() >= 899, "{}", s.candidates.len());
    }

    #[test]
    fn absurd_values_are_refused() {
        assert_eq!(
            params(-0.5, 1.0, 0, 0).validate(),
            Err(SamplingError::Temperature(-0.5))
        );
        assert!(params(f32::NAN, 1.0, 0, 0).validate().is_err());
        assert_eq!(
            params(1.0, 1.5, 0, 0).validate(),
            Err(SamplingError::TopP(1.5))
        );
        assert!(params(1.0, 0.0, 0, 0).validate().is_err());
        assert!(params(2.0, 1.0, 40, 0).validate().is_ok());
    }
}
