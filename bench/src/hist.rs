//! Latency histogram: an HDR histogram of nanoseconds with 3 significant digits, from
//! 100 ns to 60 s (values outside saturate at the bounds).

use std::time::Duration;

use hdrhistogram::Histogram;

const LOW_NS: u64 = 100;
const HIGH_NS: u64 = 60_000_000_000;

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Largest value.
    pub max_us: f64,
}

/// A latency histogram.
#[derive(Debug, Clone)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        let h = Histogram::new_with_bounds(LOW_NS, HIGH_NS, 3)
            .expect("constant histogram bounds are valid");
        Self { h }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.h.saturating_record(ns.clamp(LOW_NS, HIGH_NS));
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Self) {
        // Both histograms have identical bounds, so addition cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The value at quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_nanos(self.h.value_at_quantile(q))
    }

    /// p50, p99, p99.9, mean and max in microseconds (zeros when empty).
    pub fn percentiles(&self) -> Percentiles {
        if self.count() == 0 {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50_us: us(self.h.value_at_quantile(0.50)),
            p99_us: us(self.h.value_at_quantile(0.99)),
            p999_us: us(self.h.value_at_quantile(0.999)),
            mean_us: self.h.mean() / 1000.0,
            max_us: us(self.h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b * 0.002 + 0.001
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHist::new();
        // 1..=10000 microseconds, once each.
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 10_000);
        let p = h.percentiles();
        assert!(close(p.p50_us, 5000.0), "{p:?}");
        assert!(close(p.p99_us, 9900.0), "{p:?}");
        assert!(close(p.p999_us, 9990.0), "{p:?}");
        assert!(close(p.max_us, 10_000.0), "{p:?}");
        assert!(close(p.mean_us, 5000.5), "{p:?}");
    }

    #[test]
    fn merge_and_saturation() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        a.record(Duration::from_nanos(1)); // below the bound: counted at 100 ns
        b.record(Duration::from_secs(3600)); // above: counted at 60 s
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!(a.quantile(0.0) <= Duration::from_nanos(100));
        assert!(a.quantile(1.0) >= Duration::from_secs(59));
        assert_eq!(LatencyHist::new().percentiles(), Percentiles::default());
    }
}
