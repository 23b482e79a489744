//! Order statistics of samples.

/// The `q` quantile (0.0..=1.0) of `samples`, by linear interpolation; NaN when empty.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn median(samples: &[f64]) -> f64 {
    quantile(samples, 0.5)
}

/// Median, 10th and 90th percentile.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        Spread {
            median: median(samples),
            p10: quantile(samples, 0.1),
            p90: quantile(samples, 0.9),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "median": round2(self.median), "p10": round2(self.p10), "p90": round2(self.p90) })
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
