//! Latency samples and their summary.

use std::time::Duration;

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Summary {
    pub fn merge(parts: impl IntoIterator<Item = Summary>, elapsed: Duration) -> Summary {
        let mut all = Summary {
            elapsed,
            ..Summary::default()
        };
        for p in parts {
            all.requests += p.requests;
            all.errors += p.errors;
            all.latencies_us.extend(p.latencies_us);
        }
        all.latencies_us.sort_unstable();
        all
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of latency, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }
}

/// The `q` quantile (0..=1) of sorted microseconds, in milliseconds (NaN
/// when empty).
pub fn quantile_ms<T: Copy + Into<u64>>(sorted_us: &[T], q: f64) -> f64 {
    match sorted_us.len() {
        0 => f64::NAN,
        n => sorted_us[((n - 1) as f64 * q).round() as usize].into() as f64 / 1000.0,
    }
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}

/// The `q` quantile (0..=1) of `xs`, interpolating between the two
/// nearest values (NaN when empty); NaNs are left out.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let at = (v.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    if lo == hi {
        // Exactly one value; interpolating would turn an infinite one
        // (a reference run that served nothing) into NaN.
        return v[lo];
    }
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians() {
        let s = Summary::merge(
            [Summary {
                requests: 4,
                latencies_us: vec![4000, 1000, 3000, 2000],
                ..Summary::default()
            }],
            Duration::from_secs(2),
        );
        assert_eq!(s.rate(), 2.0);
        assert_eq!(s.quantile_ms(0.0), 1.0);
        assert_eq!(s.quantile_ms(1.0), 4.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&xs, 0.25), 2.0);
        assert_eq!(quantile(&xs, 0.75), 4.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.25), 1.25);
        assert_eq!(quantile(&xs, 1.0), 5.0);
        assert_eq!(median(&[1.0, f64::INFINITY, 2.0]), 2.0);
        assert_eq!(median(&[1.0, f64::INFINITY, f64::INFINITY]), f64::INFINITY);
    }
}
