//! The figures of a guest run, phase by phase and round by round, and the ratios between
//! backends: pure code over what the host saw (the I/O tool's lines with the backend's CPU
//! time read when each arrived), no I/O (the arithmetic over rounds is `crate::figures`'s).

use vloop_guest::io::{IoEvent, IoLine, PhaseResult};

use crate::figures::{stat_of, Failures, RoundFigures, Rounds, Stat};
use crate::procfs::{CpuSample, ThreadShare};

/// One line of the I/O tool as the host received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// The line.
    pub line: IoLine,
    /// Seconds since the guest's start when it arrived (host clock).
    pub at_s: f64,
    /// The backend's CPU time when it arrived (read for `Begin` and `End` lines only).
    pub cpu: CpuSample,
}

/// One phase on one backend in one round.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PhaseRound {
    /// Round number, from 1.
    pub round: u32,
    /// The 1-minute load average when the guest started.
    pub load_before: Option<f64>,
    /// Requests completed in the guest.
    pub ios: u64,
    /// Requests that failed or came back short.
    pub errors: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds from the first submission to the last completion, by the guest's clock.
    pub secs: f64,
    /// Requests per second (guest).
    pub iops: f64,
    /// MiB per second (guest).
    pub mib_s: f64,
    /// Median request latency seen in the guest, in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in the guest, in microseconds.
    pub p99_us: f64,
    /// Longest request in the guest, in microseconds.
    pub max_us: f64,
    /// Seconds between the host's receipt of the phase's `Begin` and `End` lines: the window
    /// over which the backend's CPU was counted (the phase, the tool's two gaps, and the
    /// lines' travel).
    pub host_secs: f64,
    /// How late the `Begin` line reached the host, in milliseconds, against the promptest
    /// line of the guest (its host time less its guest time, less the least such difference).
    pub begin_late_ms: f64,
    /// How late the `End` line reached the host, in milliseconds, the same way.
    pub end_late_ms: f64,
    /// Whether neither line was later than the tool's gap: the window then held the whole
    /// phase and nothing of the next (a later `Begin` misses the phase's start, a later `End`
    /// takes in the next phase's).
    pub window_ok: bool,
    /// Backend CPU time over the window (utime + stime, all threads), in seconds.
    pub backend_cpu_s: Option<f64>,
    /// The same per guest request, in microseconds.
    pub backend_cpu_us_per_io: Option<f64>,
    /// The same in percent of one CPU over the phase's guest time.
    pub backend_cpu_pct: Option<f64>,
    /// Backend run time per request from the exact per-thread run times, in microseconds
    /// (threads that exited during the window are missing from it).
    pub backend_run_us_per_io: Option<f64>,
    /// That run time per request in microseconds, by thread name (digits dropped).
    pub backend_threads: Vec<ThreadShare>,
}

/// How late a phase's two lines reached the host, against the tool's gap, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lateness {
    /// Of the `Begin` line.
    pub begin_s: f64,
    /// Of the `End` line.
    pub end_s: f64,
    /// The tool's gap.
    pub gap_s: f64,
}

impl Lateness {
    /// Whether neither line was later than the gap.
    pub fn ok(&self) -> bool {
        self.begin_s <= self.gap_s && self.end_s <= self.gap_s
    }
}

/// How late each of `marks` reached the host, in seconds: its host time less its guest time,
/// less the least such difference over `marks` (the promptest line is 0 late).
pub fn lateness(marks: &[Mark]) -> Vec<f64> {
    let offsets: Vec<f64> = marks
        .iter()
        .map(|m| m.at_s - m.line.t_us as f64 / 1e6)
        .collect();
    let least = offsets.iter().copied().fold(f64::INFINITY, f64::min);
    offsets.iter().map(|o| o - least).collect()
}

impl PhaseRound {
    /// The round record of a phase from its `result`, the host's marks at its `begin` and
    /// `end` and how `late` they were, the round and the load.
    pub fn new(
        round: u32,
        load_before: Option<f64>,
        result: &PhaseResult,
        begin: &Mark,
        end: &Mark,
        late: Lateness,
    ) -> PhaseRound {
        let host_secs = (end.at_s - begin.at_s).max(0.0);
        let n = result.ios.max(1) as f64;
        let used = begin.cpu.until(&end.cpu);
        let cpu_s = used.ticks.map(|t| t.as_secs_f64());
        let per_io = |s: f64| (result.ios > 0).then(|| s * 1e6 / n);
        let run_us = used.threads_ns().and_then(|ns| per_io(ns as f64 / 1e9));
        let threads = used.shares(|ns| ns as f64 / 1e3 / n);
        PhaseRound {
            round,
            load_before,
            ios: result.ios,
            errors: result.errors,
            bytes: result.bytes,
            secs: result.secs,
            iops: result.iops(),
            mib_s: result.mib_s(),
            p50_us: result.p50_us,
            p99_us: result.p99_us,
            max_us: result.max_us,
            host_secs,
            begin_late_ms: late.begin_s * 1e3,
            end_late_ms: late.end_s * 1e3,
            window_ok: late.ok(),
            backend_cpu_s: cpu_s,
            backend_cpu_us_per_io: cpu_s.and_then(per_io),
            backend_cpu_pct: cpu_s
                .filter(|_| result.secs > 0.0)
                .map(|s| s / result.secs * 100.0),
            backend_run_us_per_io: run_us,
            backend_threads: threads,
        }
    }
}

/// The rounds of every phase of one guest run, from the host's marks (the tool's gap was
/// `gap_s`): for phase `i` of `phases`, its record, or why it has none (the tool failed, or
/// the run ended before it).
pub fn phases_of_run(
    phases: usize,
    round: u32,
    load_before: Option<f64>,
    gap_s: f64,
    marks: &[Mark],
) -> Vec<Result<PhaseRound, String>> {
    let late = lateness(marks);
    let find = |want: &dyn Fn(&IoEvent) -> bool| marks.iter().position(|m| want(&m.line.event));
    (0..phases)
        .map(|i| {
            let begin = find(&|e| *e == IoEvent::Begin { phase: i })
                .ok_or_else(|| "the guest never started this phase".to_string())?;
            if let Some(error) = marks.iter().find_map(|m| match &m.line.event {
                IoEvent::Failed { phase, error } if *phase == i => Some(error),
                _ => None,
            }) {
                return Err(format!("the I/O tool failed: {error}"));
            }
            let end = find(&|e| matches!(e, IoEvent::End { phase, .. } if *phase == i))
                .ok_or_else(|| "the guest started this phase but never ended it".to_string())?;
            let IoEvent::End { result, .. } = &marks[end].line.event else {
                return Err("the guest started this phase but never ended it".to_string());
            };
            let l = Lateness {
                begin_s: late[begin],
                end_s: late[end],
                gap_s,
            };
            Ok(PhaseRound::new(
                round,
                load_before,
                result,
                &marks[begin],
                &marks[end],
                l,
            ))
        })
        .collect()
}

/// One phase on one backend, over all rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseSummary {
    /// Every successful round.
    pub rounds: Vec<PhaseRound>,
    /// IOPS over rounds.
    pub iops: Option<Stat>,
    /// MiB/s over rounds.
    pub mib_s: Option<Stat>,
    /// Median latency (microseconds) over rounds.
    pub p50_us: Option<Stat>,
    /// 99th percentile latency (microseconds) over rounds.
    pub p99_us: Option<Stat>,
    /// Backend CPU per request (microseconds) over rounds.
    pub backend_cpu_us_per_io: Option<Stat>,
    /// Backend CPU in percent of one CPU over rounds.
    pub backend_cpu_pct: Option<Stat>,
    /// Failed requests over all rounds.
    pub errors: u64,
    /// Rounds in which a line reached the host later than the tool's gap (their CPU window
    /// may miss part of the phase or take in part of the next one).
    pub late_windows: u32,
    /// The rounds that failed.
    #[serde(flatten)]
    pub failed: Failures,
}

impl PhaseSummary {
    /// Adds a successful round.
    pub fn add(&mut self, r: PhaseRound) {
        self.errors += r.errors;
        self.late_windows += u32::from(!r.window_ok);
        self.rounds.push(r);
        let rs = &self.rounds;
        self.iops = stat_of(rs, |x| Some(x.iops));
        self.mib_s = stat_of(rs, |x| Some(x.mib_s));
        self.p50_us = stat_of(rs, |x| Some(x.p50_us));
        self.p99_us = stat_of(rs, |x| Some(x.p99_us));
        self.backend_cpu_us_per_io = stat_of(rs, |x| x.backend_cpu_us_per_io);
        self.backend_cpu_pct = stat_of(rs, |x| x.backend_cpu_pct);
    }

    /// Records a failed round.
    pub fn fail(&mut self, round: u32, why: String) {
        self.failed.record(round, why);
    }
}

impl RoundFigures for PhaseRound {
    fn round(&self) -> u32 {
        self.round
    }

    /// Requests per second in the guest: the ratio is the guest's throughput's.
    fn iops(&self) -> f64 {
        self.iops
    }

    fn p50_us(&self) -> f64 {
        self.p50_us
    }

    /// The exact per-thread run time per request: clock ticks (10 ms) are too coarse for
    /// short phases, where one side may show none at all.
    fn cpu_us_per_io(&self) -> Option<f64> {
        self.backend_run_us_per_io
    }
}

impl Rounds for PhaseSummary {
    type Round = PhaseRound;

    fn rounds(&self) -> &[PhaseRound] {
        &self.rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::figures::{paired_ratio, QsdRatios};
    use crate::procfs::ThreadCpu;
    use crate::target::Target;

    /// A mark of `event` written at `guest_s` by the guest's clock and received at `at_s`.
    fn mark(
        event: IoEvent,
        guest_s: f64,
        at_s: f64,
        ticks_ms: u64,
        threads: &[(u32, &str, u64)],
    ) -> Mark {
        Mark {
            line: IoLine {
                t_us: (guest_s * 1e6) as u64,
                event,
            },
            at_s,
            cpu: CpuSample {
                ticks: Some(Duration::from_millis(ticks_ms)),
                threads: Some(
                    threads
                        .iter()
                        .map(|&(tid, name, cpu_ns)| ThreadCpu {
                            tid,
                            name: name.into(),
                            cpu_ns,
                        })
                        .collect(),
                ),
            },
        }
    }

    fn result(ios: u64, secs: f64) -> PhaseResult {
        PhaseResult {
            ios,
            errors: 0,
            bytes: ios * 4096,
            secs,
            p50_us: 100.0,
            p99_us: 200.0,
            max_us: 300.0,
        }
    }

    fn end(phase: usize, result: PhaseResult) -> IoEvent {
        IoEvent::End { phase, result }
    }

    #[test]
    fn a_phase_takes_the_cpu_between_its_marks() {
        let r = result(1000, 2.0);
        let marks = [
            mark(
                IoEvent::Begin { phase: 0 },
                0.5,
                1.0,
                500,
                &[(1, "main", 1_000)],
            ),
            // 2 s of I/O between two gaps of 0.2 s; the line came 0.1 s later than the first.
            mark(
                end(0, r),
                2.9,
                3.5,
                550,
                &[(1, "main", 21_001_000), (7, "iou-wrk-7", 9_000_000)],
            ),
        ];
        let got = phases_of_run(2, 3, Some(0.5), 0.2, &marks);
        let p = got[0].as_ref().unwrap();
        assert_eq!((p.round, p.load_before, p.ios), (3, Some(0.5), 1000));
        assert_eq!((p.iops, p.host_secs), (500.0, 2.5));
        assert!(p.window_ok);
        assert_eq!(p.begin_late_ms, 0.0);
        assert!((p.end_late_ms - 100.0).abs() < 1e-6, "{}", p.end_late_ms);
        assert!((p.backend_cpu_s.unwrap() - 0.05).abs() < 1e-9);
        assert!((p.backend_cpu_us_per_io.unwrap() - 50.0).abs() < 1e-9);
        assert!((p.backend_cpu_pct.unwrap() - 2.5).abs() < 1e-9);
        assert!((p.backend_run_us_per_io.unwrap() - 30.0).abs() < 1e-9);
        assert_eq!(p.backend_threads[0].thread, "main");
        assert!((p.backend_threads[0].value - 21.0).abs() < 1e-9);
        assert_eq!(p.backend_threads[1].thread, "iou-wrk-");
        assert_eq!(
            got[1].as_ref().unwrap_err(),
            "the guest never started this phase"
        );
    }

    #[test]
    fn late_lines_failures_and_cut_runs_are_told_apart() {
        let marks = [
            mark(IoEvent::Begin { phase: 0 }, 0.0, 1.0, 0, &[]),
            // 0.3 s late: after the next phase's gap of 0.2 s, its I/O had begun.
            mark(end(0, result(10, 2.0)), 2.4, 3.7, 0, &[]),
            mark(IoEvent::Begin { phase: 1 }, 2.4, 3.41, 0, &[]),
            mark(
                IoEvent::Failed {
                    phase: 1,
                    error: "EIO".into(),
                },
                2.5,
                3.52,
                0,
                &[],
            ),
            mark(IoEvent::Begin { phase: 2 }, 3.0, 4.0, 0, &[]),
        ];
        let got = phases_of_run(3, 1, None, 0.2, &marks);
        let p = got[0].as_ref().unwrap();
        assert!(!p.window_ok);
        assert!((p.end_late_ms - 300.0).abs() < 1e-6, "{}", p.end_late_ms);
        assert_eq!(p.backend_cpu_us_per_io, Some(0.0));
        assert!(got[1].as_ref().unwrap_err().contains("EIO"));
        assert!(got[2].as_ref().unwrap_err().contains("never ended"));
        let ok = Lateness::default();
        // No I/O: no figure per I/O, but no division by zero either.
        let p = PhaseRound::new(1, None, &result(0, 0.0), &marks[0], &marks[1], ok);
        assert_eq!((p.backend_cpu_us_per_io, p.backend_cpu_pct), (None, None));
        // No CPU readings: no CPU figures.
        let bare = Mark {
            cpu: CpuSample::default(),
            ..marks[0].clone()
        };
        let p = PhaseRound::new(1, None, &result(5, 1.0), &bare, &marks[1], ok);
        assert_eq!((p.backend_cpu_s, p.backend_run_us_per_io), (None, None));
        assert!(lateness(&[]).is_empty());
    }

    fn summary(iops: &[f64], cpu: &[f64]) -> PhaseSummary {
        let mut s = PhaseSummary::default();
        for (i, (&x, &c)) in iops.iter().zip(cpu).enumerate() {
            s.add(PhaseRound {
                round: i as u32 + 1,
                iops: x,
                p50_us: 1e6 / x,
                backend_cpu_us_per_io: Some(c),
                backend_run_us_per_io: Some(c),
                window_ok: true,
                ..PhaseRound::default()
            });
        }
        s
    }

    #[test]
    fn ratios_pair_rounds_against_the_better_qsd() {
        let vloop = summary(&[200.0, 40.0, 30.0], &[1.0, 1.0, 1.0]);
        let iot = summary(&[100.0, 20.0, 30.0], &[2.0, 4.0, 1.0]);
        let main = summary(&[10.0, 10.0, 10.0], &[1.0, 1.0, 1.0]);
        let r = QsdRatios::of(
            &vloop,
            &[
                (Target::Qsd, Some(&main)),
                (Target::QsdIothread, Some(&iot)),
            ],
        );
        assert_eq!(r.best_qsd, Some(Target::QsdIothread));
        // Round by round 2x, 2x, 1x: the median is 2x (the ratio of medians would be 1.33x).
        assert_eq!(r.vloop_over_qsd, Some(2.0));
        assert_eq!(r.vloop_p50_over_qsd, Some(0.5));
        assert_eq!(r.vloop_cpu_over_qsd, Some(0.5));
        let mut failed = PhaseSummary::default();
        failed.fail(1, "no".into());
        assert!(!failed.measured());
        let r = QsdRatios::of(&vloop, &[(Target::QsdIothread, Some(&failed))]);
        assert_eq!(r, QsdRatios::default());
        // No common round: the ratio of the medians.
        let mut late = summary(&[20.0], &[2.0]);
        late.rounds[0].round = 9;
        assert_eq!(paired_ratio(&vloop, &late, |r| Some(r.iops)), Some(2.0));
    }

    #[test]
    fn summaries_track_rounds_windows_and_failures() {
        let mut s = summary(&[10.0, 30.0, 20.0], &[5.0, 1.0, 3.0]);
        s.add(PhaseRound {
            round: 4,
            iops: 40.0,
            errors: 2,
            window_ok: false,
            ..PhaseRound::default()
        });
        s.fail(5, "crashed".into());
        assert_eq!(s.iops.unwrap().median, 25.0);
        assert_eq!(s.backend_cpu_us_per_io.unwrap().median, 3.0);
        assert_eq!((s.errors, s.late_windows), (2, 1));
        assert_eq!(s.failed.failed_rounds, [5]);
        assert_eq!(s.failed.failure.as_deref(), Some("crashed"));
    }
}
