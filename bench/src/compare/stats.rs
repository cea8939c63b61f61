//! The figures of a comparison, round by round and summarised (median, least, greatest), and
//! the ratios between backends: pure code over measured runs, no I/O (the arithmetic over
//! rounds is `crate::figures`'s).

pub use crate::figures::Stat;
use crate::figures::{paired_ratio, stat_of, Failures, QsdRatios, RoundFigures, Rounds};
use crate::hist::{LatencyHist, Percentiles};
use crate::load::RunResult;
use crate::procfs::ThreadShare;
use crate::target::Target;

/// One run of one target on one workload.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Round {
    /// Round number, from 1.
    pub round: u32,
    /// The 1-minute load average when the run started.
    pub load_before: Option<f64>,
    /// Completed requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency percentiles of this run.
    pub latency: Percentiles,
    /// Backend CPU (user + system, all threads) per request, in microseconds.
    pub backend_cpu_us_per_io: Option<f64>,
    /// CPU of vloop-bench itself (the frontend, or the raw io_uring engine) per request, in
    /// microseconds.
    pub frontend_cpu_us_per_io: Option<f64>,
    /// Backend CPU per request in microseconds by thread name.
    pub backend_threads: Vec<ThreadShare>,
    /// Kicks (frontend to backend notifications) per request.
    pub kicks_per_io: f64,
    /// Sleeps on the call eventfd (backend to frontend notifications waited for) per request.
    pub waits_per_io: f64,
    /// Completed requests.
    pub ios: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Measured seconds.
    pub secs: f64,
    /// The backend's memory at the end of the run.
    #[serde(flatten)]
    pub memory: Footprint,
}

/// A backend process's memory, read from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Peak resident set (VmHWM) in KiB. It counts the pages of guest memory (the frontend's
    /// shared memfd) the backend touched, as QEMU's backends do alike.
    pub peak_rss_kib: Option<u64>,
    /// Anonymous resident memory (RssAnon) in KiB: the backend's own heap and stacks, without
    /// the guest memory it maps.
    pub anon_rss_kib: Option<u64>,
}

impl Round {
    /// The round record of run `r`.
    pub fn new(round: u32, load_before: Option<f64>, r: &RunResult, memory: Footprint) -> Self {
        let n = r.frontend.submitted.max(1) as f64;
        Round {
            round,
            load_before,
            iops: r.iops,
            mib_s: r.mib_s,
            latency: r.latency,
            backend_cpu_us_per_io: r.backend_cpu_us_per_io,
            frontend_cpu_us_per_io: r.client_cpu_us_per_io,
            backend_threads: r.backend_threads.clone(),
            kicks_per_io: r.frontend.kicks as f64 / n,
            waits_per_io: r.frontend.waits as f64 / n,
            ios: r.ios,
            errors: r.errors,
            secs: r.secs,
            memory,
        }
    }
}

/// One target's figures on one workload, over all rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Every successful round.
    pub rounds: Vec<Round>,
    /// IOPS of each successful round, in order.
    pub iops_rounds: Vec<f64>,
    /// IOPS over rounds.
    pub iops: Option<Stat>,
    /// MiB/s over rounds.
    pub mib_s: Option<Stat>,
    /// Median latency (microseconds) over rounds.
    pub p50_us: Option<Stat>,
    /// 99th percentile latency (microseconds) over rounds.
    pub p99_us: Option<Stat>,
    /// 99.9th percentile latency (microseconds) over rounds.
    pub p999_us: Option<Stat>,
    /// Backend CPU per request (microseconds) over rounds.
    pub backend_cpu_us_per_io: Option<Stat>,
    /// vloop-bench's own CPU per request (microseconds) over rounds.
    pub frontend_cpu_us_per_io: Option<Stat>,
    /// Latency percentiles of all rounds' requests together.
    pub latency_all_rounds: Percentiles,
    /// Kicks per request over all rounds.
    pub kicks_per_io: f64,
    /// Call waits per request over all rounds.
    pub waits_per_io: f64,
    /// Failed requests over all rounds.
    pub errors: u64,
    /// Greatest peak resident set (VmHWM, KiB) of the backend after a run.
    pub peak_rss_kib: Option<u64>,
    /// Greatest anonymous resident memory (RssAnon, KiB) of the backend after a run.
    pub anon_rss_kib: Option<u64>,
    /// The runs that failed.
    #[serde(flatten)]
    pub failed: Failures,
    #[serde(skip)]
    hist: LatencyHist,
    #[serde(skip)]
    kicks: f64,
    #[serde(skip)]
    waits: f64,
    #[serde(skip)]
    submitted: f64,
}

impl Summary {
    /// Adds a successful run (its histogram joins the all-rounds latency).
    pub fn add(&mut self, round: Round, hist: &LatencyHist) {
        self.hist.merge(hist);
        let n = (round.ios as f64).max(1.0);
        self.kicks += round.kicks_per_io * n;
        self.waits += round.waits_per_io * n;
        self.submitted += n;
        self.errors += round.errors;
        self.peak_rss_kib = self.peak_rss_kib.max(round.memory.peak_rss_kib);
        self.anon_rss_kib = self.anon_rss_kib.max(round.memory.anon_rss_kib);
        self.iops_rounds.push(round.iops);
        self.rounds.push(round);
        let r = &self.rounds;
        self.iops = stat_of(r, |x| Some(x.iops));
        self.mib_s = stat_of(r, |x| Some(x.mib_s));
        self.p50_us = stat_of(r, |x| Some(x.latency.p50_us));
        self.p99_us = stat_of(r, |x| Some(x.latency.p99_us));
        self.p999_us = stat_of(r, |x| Some(x.latency.p999_us));
        self.backend_cpu_us_per_io = stat_of(r, |x| x.backend_cpu_us_per_io);
        self.frontend_cpu_us_per_io = stat_of(r, |x| x.frontend_cpu_us_per_io);
        self.latency_all_rounds = self.hist.percentiles();
        self.kicks_per_io = self.kicks / self.submitted.max(1.0);
        self.waits_per_io = self.waits / self.submitted.max(1.0);
    }

    /// Records a failed run.
    pub fn fail(&mut self, round: u32, why: String) {
        self.failed.record(round, why);
    }
}

impl RoundFigures for Round {
    fn round(&self) -> u32 {
        self.round
    }

    fn iops(&self) -> f64 {
        self.iops
    }

    fn p50_us(&self) -> f64 {
        self.latency.p50_us
    }

    /// The backend's CPU time (clock ticks of all its threads) per request.
    fn cpu_us_per_io(&self) -> Option<f64> {
        self.backend_cpu_us_per_io
    }
}

impl Rounds for Summary {
    type Round = Round;

    fn rounds(&self) -> &[Round] {
        &self.rounds
    }
}

/// The ratios of a row: vloop-blk against the better qemu-storage-daemon configuration, against
/// raw io_uring, and (qcow2 mode: vloop-blk on the qcow2 copy) against vloop-blk on the raw
/// image.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Ratios {
    /// Against the better qemu-storage-daemon configuration.
    #[serde(flatten)]
    pub qsd: QsdRatios,
    /// vloop IOPS / raw io_uring IOPS.
    pub vloop_over_raw: Option<f64>,
    /// vloop IOPS / vloop-raw IOPS (qcow2 mode: what the qcow2 layer costs; above 0.9 is the
    /// goal on allocated clusters).
    pub vloop_over_vloop_raw: Option<f64>,
}

impl Ratios {
    /// The ratios of vloop's summary against those of the qsd configurations, raw and
    /// vloop-raw.
    pub fn of(
        vloop: &Summary,
        qsd: Option<&Summary>,
        qsd_iothread: Option<&Summary>,
        raw: Option<&Summary>,
        vloop_raw: Option<&Summary>,
    ) -> Ratios {
        Ratios {
            qsd: QsdRatios::of(
                vloop,
                &[(Target::Qsd, qsd), (Target::QsdIothread, qsd_iothread)],
            ),
            vloop_over_raw: raw.and_then(|r| paired_ratio(vloop, r, |x| Some(x.iops))),
            vloop_over_vloop_raw: vloop_raw.and_then(|r| paired_ratio(vloop, r, |x| Some(x.iops))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fixtures::summary_cpu as summary;

    #[test]
    fn the_better_qsd_is_chosen_and_named() {
        let vloop = summary(&[300.0, 300.0], &[1.0, 1.0]);
        let main = summary(&[100.0, 120.0], &[2.0, 2.0]);
        let iot = summary(&[150.0, 150.0], &[3.0, 3.0]);
        let r = Ratios::of(&vloop, Some(&main), Some(&iot), None, None);
        assert_eq!(r.qsd.best_qsd, Some(Target::QsdIothread));
        assert_eq!(r.qsd.vloop_over_qsd, Some(2.0));
        assert_eq!(r.qsd.vloop_p50_over_qsd, Some(0.5));
        assert_eq!(r.qsd.vloop_cpu_over_qsd, Some(1.0 / 3.0));
        assert_eq!(r.vloop_over_raw, None);
        assert_eq!(r.vloop_over_vloop_raw, None);
        // The main loop wins when it is faster; a configuration that failed does not count.
        let slow = summary(&[50.0], &[1.0]);
        let r = Ratios::of(&vloop, Some(&main), Some(&slow), Some(&main), None);
        assert_eq!(r.qsd.best_qsd, Some(Target::Qsd));
        assert_eq!(r.vloop_over_raw, Some(2.75));
        // vloop-raw pairs rounds as the others do: 300/400 and 300/250.
        let vraw = summary(&[400.0, 250.0], &[1.0, 1.0]);
        let r = Ratios::of(&vloop, None, None, None, Some(&vraw));
        assert_eq!(r.vloop_over_vloop_raw, Some((0.75 + 1.2) / 2.0));
        assert_eq!(
            (r.qsd.best_qsd, r.qsd.vloop_over_qsd, r.vloop_over_raw),
            (None, None, None)
        );
        let mut failed = Summary::default();
        failed.fail(1, "no".into());
        let r = Ratios::of(&vloop, Some(&failed), Some(&slow), None, None);
        assert_eq!(r.qsd.best_qsd, Some(Target::QsdIothread));
        assert_eq!(r.qsd.vloop_over_qsd, Some(6.0));
        // A tie goes to the first (main loop); with no qsd at all there is no ratio.
        let r = Ratios::of(&vloop, Some(&main), Some(&main.clone()), None, None);
        assert_eq!(r.qsd.best_qsd, Some(Target::Qsd));
        assert_eq!(
            Ratios::of(&vloop, None, None, None, None),
            Ratios::default()
        );
    }

    #[test]
    fn summaries_track_rounds_and_failures() {
        let mut s = summary(&[10.0, 30.0, 20.0], &[5.0, 1.0, 3.0]);
        s.fail(4, "crashed".into());
        s.fail(5, "again".into());
        assert_eq!(s.iops.unwrap().median, 20.0);
        assert_eq!(s.iops_rounds, [10.0, 30.0, 20.0]);
        assert_eq!(s.backend_cpu_us_per_io.unwrap().min, 1.0);
        assert_eq!(s.failed.failure.as_deref(), Some("crashed"));
        assert_eq!(s.failed.failed_rounds, [4, 5]);
        assert!(s.measured());
        assert!(!Summary::default().measured());
    }
}
