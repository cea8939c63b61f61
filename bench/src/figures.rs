//! The arithmetic both comparisons do over rounds, pure: a figure's median, least and
//! greatest; a's figure over b's as the median of per-round ratios; the better of the
//! qemu-storage-daemon configurations and vloop-blk's ratios against it; the record of the
//! rounds that failed. The host comparison's runs and the guest comparison's phases plug in
//! through [`RoundFigures`] and [`Rounds`].

use crate::target::Target;

/// The median, least and greatest of one figure over rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Stat {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Least value.
    pub min: f64,
    /// Greatest value.
    pub max: f64,
}

impl Stat {
    /// The summary of `values`, or `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Stat {
            median: median_sorted(&s),
            min: s[0],
            max: s[s.len() - 1],
        })
    }
}

fn median_sorted(s: &[f64]) -> f64 {
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    Stat::of(v).map_or(0.0, |s| s.median)
}

/// The summary of `figure` over the `rounds` that have it.
pub fn stat_of<R>(rounds: &[R], figure: impl Fn(&R) -> Option<f64>) -> Option<Stat> {
    let v: Vec<f64> = rounds.iter().filter_map(figure).collect();
    Stat::of(&v)
}

/// One round of one target, as the ratios read it.
pub trait RoundFigures {
    /// Round number, from 1.
    fn round(&self) -> u32;
    /// Requests per second.
    fn iops(&self) -> f64;
    /// Median request latency in microseconds.
    fn p50_us(&self) -> f64;
    /// The backend's CPU per request in microseconds that the CPU ratio compares.
    fn cpu_us_per_io(&self) -> Option<f64>;
}

/// One target's successful rounds on one row.
pub trait Rounds {
    /// The record of one round.
    type Round: RoundFigures;

    /// Every successful round, in order.
    fn rounds(&self) -> &[Self::Round];

    /// Whether at least one round succeeded.
    fn measured(&self) -> bool {
        !self.rounds().is_empty()
    }

    /// Median IOPS (0 with no successful round).
    fn median_iops(&self) -> f64 {
        stat_of(self.rounds(), |r| Some(r.iops())).map_or(0.0, |s| s.median)
    }
}

/// a's figure over b's: the median of the per-round ratios over the rounds both measured (runs
/// of one round are adjacent in time, so they share the machine's background load); with no
/// such round, the ratio of the medians. `None` when either side has no figure or b's is 0.
pub fn paired_ratio<S: Rounds>(
    a: &S,
    b: &S,
    figure: impl Fn(&S::Round) -> Option<f64>,
) -> Option<f64> {
    let per_round: Vec<f64> = a
        .rounds()
        .iter()
        .filter_map(|x| {
            let y = b.rounds().iter().find(|y| y.round() == x.round())?;
            let (fx, fy) = (figure(x)?, figure(y)?);
            (fy > 0.0).then(|| fx / fy)
        })
        .collect();
    if !per_round.is_empty() {
        return Some(median(&per_round));
    }
    let ma = stat_of(a.rounds(), &figure)?.median;
    let mb = stat_of(b.rounds(), &figure)?.median;
    (mb > 0.0).then(|| ma / mb)
}

/// Of the qemu-storage-daemon configurations measured on a row, the one with the higher median
/// IOPS (the earlier one on a tie); configurations with no successful round do not count.
pub fn best_of<'a, S: Rounds>(candidates: &[(Target, Option<&'a S>)]) -> Option<(Target, &'a S)> {
    let mut best: Option<(Target, &S)> = None;
    for (t, s) in candidates {
        let Some(s) = s.filter(|s| s.measured() && s.median_iops() > 0.0) else {
            continue;
        };
        if best.is_none_or(|(_, b)| s.median_iops() > b.median_iops()) {
            best = Some((*t, s));
        }
    }
    best
}

/// vloop-blk against the better qemu-storage-daemon configuration of a row, each ratio the
/// median of per-round ratios.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct QsdRatios {
    /// The qemu-storage-daemon configuration the ratios are taken against (the one with the
    /// higher median IOPS).
    pub best_qsd: Option<Target>,
    /// vloop IOPS / best qsd IOPS (above 1: vloop is faster; its inverse is the ratio of the
    /// time a fixed amount of I/O takes).
    pub vloop_over_qsd: Option<f64>,
    /// vloop p50 latency / best qsd p50 latency (below 1: vloop is faster).
    pub vloop_p50_over_qsd: Option<f64>,
    /// vloop backend CPU per request / best qsd's (below 1: vloop uses less).
    pub vloop_cpu_over_qsd: Option<f64>,
}

impl QsdRatios {
    /// The ratios of `vloop` against the better of `candidates` ([`best_of`]); all `None` when
    /// no candidate has a figure.
    pub fn of<S: Rounds>(vloop: &S, candidates: &[(Target, Option<&S>)]) -> Self {
        let Some((t, b)) = best_of(candidates) else {
            return Self::default();
        };
        Self {
            best_qsd: Some(t),
            vloop_over_qsd: paired_ratio(vloop, b, |r| Some(r.iops())),
            vloop_p50_over_qsd: paired_ratio(vloop, b, |r| Some(r.p50_us())),
            vloop_cpu_over_qsd: paired_ratio(vloop, b, RoundFigures::cpu_us_per_io),
        }
    }
}

/// The rounds of one target that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Failures {
    /// Why a round failed, if one did (the first failure).
    pub failure: Option<String>,
    /// Rounds that failed.
    pub failed_rounds: Vec<u32>,
}

impl Failures {
    /// Records that round `round` failed because of `why`.
    pub fn record(&mut self, round: u32, why: String) {
        self.failed_rounds.push(round);
        self.failure.get_or_insert(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round with its number, IOPS and CPU; p50 the inverse of IOPS.
    #[derive(Debug, Clone)]
    struct R(u32, f64, Option<f64>);

    impl RoundFigures for R {
        fn round(&self) -> u32 {
            self.0
        }
        fn iops(&self) -> f64 {
            self.1
        }
        fn p50_us(&self) -> f64 {
            1e6 / self.1
        }
        fn cpu_us_per_io(&self) -> Option<f64> {
            self.2
        }
    }

    #[derive(Debug, Clone, Default)]
    struct S(Vec<R>);

    impl Rounds for S {
        type Round = R;
        fn rounds(&self) -> &[R] {
            &self.0
        }
    }

    /// Rounds 1, 2, ... with these IOPS and CPU figures.
    fn rounds(iops: &[f64], cpu: &[f64]) -> S {
        S((1..)
            .zip(iops.iter().zip(cpu))
            .map(|(n, (&i, &c))| R(n, i, Some(c)))
            .collect())
    }

    #[test]
    fn stats_are_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(&[]), None);
        assert_eq!(median(&[]), 0.0);
        let r = rounds(&[10.0, 30.0, 20.0], &[5.0, 1.0, 3.0]);
        assert_eq!(stat_of(&r.0, |r| r.2).unwrap().min, 1.0);
        assert_eq!(r.median_iops(), 20.0);
        assert!(r.measured() && !S::default().measured());
    }

    #[test]
    fn ratios_pair_rounds() {
        // Round by round: 2x, 2x, 1x -> median 2x (the ratio of medians would be 1.5x).
        let a = rounds(&[200.0, 40.0, 30.0], &[1.0, 1.0, 1.0]);
        let b = rounds(&[100.0, 20.0, 30.0], &[2.0, 4.0, 1.0]);
        assert_eq!(paired_ratio(&a, &b, |r| Some(r.iops())), Some(2.0));
        assert_eq!(paired_ratio(&a, &b, RoundFigures::cpu_us_per_io), Some(0.5));
        // Round 1 of b failed: rounds 2 and 3 pair (2x and 1x).
        let mut c = rounds(&[20.0, 30.0], &[1.0, 1.0]);
        for r in &mut c.0 {
            r.0 += 1;
        }
        assert_eq!(paired_ratio(&a, &c, |r| Some(r.iops())), Some(1.5));
        // No common round: the ratio of medians.
        let mut d = rounds(&[10.0], &[1.0]);
        d.0[0].0 = 9;
        assert_eq!(paired_ratio(&a, &d, |r| Some(r.iops())), Some(4.0));
        assert_eq!(paired_ratio(&S::default(), &b, |r| Some(r.iops())), None);
        assert_eq!(paired_ratio(&a, &b, |_| None), None);
    }

    #[test]
    fn failures_keep_the_first_reason_and_every_round() {
        let mut f = Failures::default();
        f.record(4, "crashed".into());
        f.record(5, "again".into());
        assert_eq!(f.failure.as_deref(), Some("crashed"));
        assert_eq!(f.failed_rounds, [4, 5]);
    }
}
