//! The I/O tool's protocol: the phases a host asks the guest to run on one block device with
//! O_DIRECT, and the lines the tool prints on its stdout as it goes.
//!
//! The tool is an applet of the guest agent (`/init io PLAN`, PLAN as JSON, see
//! [`IoPlan::argv`]); under `vloop-harness exec` its stdout reaches the host as it is written,
//! so the host can act on each phase's [`IoEvent::Begin`] and [`IoEvent::End`] while the guest
//! runs (`vloop-bench --guest` reads the backend's CPU time there). Between the `Begin` line
//! and the first request, and between the last completion and the `End` line, the tool waits
//! [`IoPlan::gap_ms`], so that a host acting on a line does so while the device is idle. Each
//! line carries the guest's clock ([`IoLine::t_us`]), so the host can tell how late each
//! line reached it, relative to the promptest one.
//!
//! Parsing is pure and shared by both sides, so they cannot disagree about the format.

use serde::{Deserialize, Serialize};

/// The agent's own path in the guest: the applet is `AGENT_PATH APPLET PLAN`.
pub const AGENT_PATH: &str = "/init";
/// The first argument that selects the I/O tool.
pub const APPLET: &str = "io";
/// The largest request size a phase may use.
pub const MAX_BS: u32 = 64 << 20;
/// The greatest queue depth a phase may use.
pub const MAX_QD: u32 = 1024;
/// The longest gap the plan may ask for, in milliseconds.
pub const MAX_GAP_MS: u64 = 60_000;

/// Errors of a plan that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoPlanError {
    /// The plan has no phase.
    #[error("the I/O plan has no phase")]
    NoPhases,
    /// A request size that is zero, not a multiple of 512 or too large.
    #[error("phase {phase}: request size {bs} is not a multiple of 512 from 512 to {MAX_BS}")]
    BlockSize {
        /// Index of the phase.
        phase: usize,
        /// The size asked for.
        bs: u32,
    },
    /// A queue depth of zero or above [`MAX_QD`].
    #[error("phase {phase}: queue depth {qd} is not from 1 to {MAX_QD}")]
    QueueDepth {
        /// Index of the phase.
        phase: usize,
        /// The depth asked for.
        qd: u32,
    },
    /// A phase of no time.
    #[error("phase {0}: a run time of 0 ms")]
    Runtime(usize),
    /// A gap above [`MAX_GAP_MS`].
    #[error("a gap of {0} ms between phases (at most {MAX_GAP_MS})")]
    Gap(u64),
    /// The device path is empty.
    #[error("the I/O plan names no device")]
    NoDevice,
}

/// How a phase walks the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads from offset 0, wrapping at the end of the device.
    Read,
    /// Sequential writes from offset 0, wrapping at the end of the device.
    Write,
    /// Reads at uniformly random offsets aligned to the request size.
    RandRead,
    /// Writes at uniformly random offsets aligned to the request size.
    RandWrite,
}

impl Pattern {
    /// Whether the phase writes.
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::RandWrite)
    }

    /// Whether offsets are random.
    pub fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }

    /// Its name (`read`, `randwrite`...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
        }
    }
}

/// One phase: `qd` requests of `bs` bytes in flight for `runtime_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoPhase {
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per request (a multiple of 512).
    pub bs: u32,
    /// Requests in flight.
    pub qd: u32,
    /// How long requests are started, in milliseconds of the guest's clock.
    pub runtime_ms: u64,
}

/// A byte count in a short form: 4k, 1M, 1536.
pub fn size_name(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}k", b >> 10)
    } else {
        b.to_string()
    }
}

impl IoPhase {
    /// `qd` requests of `bs` bytes of `pattern` in flight for `runtime_ms`.
    pub fn new(pattern: Pattern, bs: u32, qd: u32, runtime_ms: u64) -> IoPhase {
        IoPhase {
            pattern,
            bs,
            qd,
            runtime_ms,
        }
    }

    /// Its name in tables: `4k randread QD1`, `1M write QD1`.
    pub fn name(&self) -> String {
        format!(
            "{} {} QD{}",
            size_name(u64::from(self.bs)),
            self.pattern.name(),
            self.qd
        )
    }
}

/// Everything the tool does: the phases, in order, on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoPlan {
    /// The block device, e.g. `/dev/vda` (opened with O_DIRECT).
    pub dev: String,
    /// The phases, in order.
    pub phases: Vec<IoPhase>,
    /// Idle time after each `Begin` line and before each `End` line, in milliseconds.
    pub gap_ms: u64,
    /// Seed of the random offsets (phase `i` uses `seed + i`) and of the written data.
    pub seed: u64,
}

impl IoPlan {
    /// Checks what the tool cannot run.
    pub fn check(&self) -> Result<(), IoPlanError> {
        if self.dev.is_empty() {
            return Err(IoPlanError::NoDevice);
        }
        if self.phases.is_empty() {
            return Err(IoPlanError::NoPhases);
        }
        if self.gap_ms > MAX_GAP_MS {
            return Err(IoPlanError::Gap(self.gap_ms));
        }
        for (phase, p) in self.phases.iter().enumerate() {
            if p.bs == 0 || !p.bs.is_multiple_of(512) || p.bs > MAX_BS {
                return Err(IoPlanError::BlockSize { phase, bs: p.bs });
            }
            if p.qd == 0 || p.qd > MAX_QD {
                return Err(IoPlanError::QueueDepth { phase, qd: p.qd });
            }
            if p.runtime_ms == 0 {
                return Err(IoPlanError::Runtime(phase));
            }
        }
        Ok(())
    }

    /// Whether any phase writes (the device is then opened read-write).
    pub fn writes(&self) -> bool {
        self.phases.iter().any(|p| p.pattern.writes())
    }

    /// The command line that runs the plan in a guest.
    pub fn argv(&self) -> Vec<String> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![AGENT_PATH.to_string(), APPLET.to_string(), json]
    }

    /// The plan from the command line's PLAN argument.
    pub fn from_arg(arg: &str) -> Result<IoPlan, String> {
        let plan: IoPlan =
            serde_json::from_str(arg).map_err(|e| format!("cannot parse the I/O plan: {e}"))?;
        plan.check().map_err(|e| e.to_string())?;
        Ok(plan)
    }
}

/// What one phase did, by the guest's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseResult {
    /// Requests completed (failed ones included).
    pub ios: u64,
    /// Requests that failed or moved fewer bytes than asked.
    pub errors: u64,
    /// Bytes moved by the requests that succeeded.
    pub bytes: u64,
    /// Seconds from the first submission to the last completion.
    pub secs: f64,
    /// Median latency of a request, in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, in microseconds.
    pub p99_us: f64,
    /// The longest request, in microseconds.
    pub max_us: f64,
}

impl PhaseResult {
    /// Requests per second (0 for a phase of no time).
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ios as f64 / self.secs
        } else {
            0.0
        }
    }

    /// MiB per second (0 for a phase of no time).
    pub fn mib_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / f64::from(1u32 << 20)
        } else {
            0.0
        }
    }
}

/// One line the tool prints on stdout: a JSON object, `"io"` naming the event, `"t_us"` the
/// time it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoLine {
    /// Microseconds since the tool started, by the guest's clock, when the line was written.
    pub t_us: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: IoEvent,
}

/// What a line of the tool says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "io", rename_all = "snake_case")]
pub enum IoEvent {
    /// The device was opened.
    Device {
        /// Its path.
        dev: String,
        /// Its size in bytes.
        bytes: u64,
    },
    /// Phase `phase` is about to start (after the plan's gap).
    Begin {
        /// Index in the plan.
        phase: usize,
    },
    /// Phase `phase` ended (the plan's gap ago).
    End {
        /// Index in the plan.
        phase: usize,
        /// Its figures.
        result: PhaseResult,
    },
    /// Phase `phase` could not run; the tool stops.
    Failed {
        /// Index in the plan.
        phase: usize,
        /// Why.
        error: String,
    },
}

impl IoLine {
    /// The line as printed (JSON, no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a line the tool printed; `None` for any other line.
    pub fn parse(line: &str) -> Option<IoLine> {
        let t = line.trim();
        if !t.starts_with('{') {
            return None;
        }
        serde_json::from_str(t).ok()
    }
}

/// The p-th percentile (0 to 100) of `sorted` (ascending), by the nearest rank; 0 when empty.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    f64::from(sorted[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(pattern: Pattern, bs: u32, qd: u32) -> IoPhase {
        IoPhase::new(pattern, bs, qd, 500)
    }

    fn plan(phases: Vec<IoPhase>) -> IoPlan {
        IoPlan {
            dev: "/dev/vda".into(),
            phases,
            gap_ms: 200,
            seed: 7,
        }
    }

    #[test]
    fn plans_round_trip_through_the_command_line() {
        let p = plan(vec![
            phase(Pattern::Read, 1 << 20, 1),
            phase(Pattern::RandWrite, 4096, 32),
        ]);
        let argv = p.argv();
        assert_eq!(argv[..2], ["/init", "io"]);
        assert!(argv[2].contains("\"pattern\":\"randwrite\""), "{}", argv[2]);
        assert_eq!(IoPlan::from_arg(&argv[2]).unwrap(), p);
        assert!(p.writes());
        assert!(!plan(vec![phase(Pattern::RandRead, 4096, 1)]).writes());
        assert_eq!(p.phases[0].name(), "1M read QD1");
        assert_eq!(p.phases[1].name(), "4k randwrite QD32");
        assert_eq!(phase(Pattern::Read, 1536, 2).name(), "1536 read QD2");
    }

    #[test]
    fn plans_that_cannot_run_are_refused() {
        let bad = |p: IoPlan| p.check().unwrap_err();
        assert_eq!(bad(plan(vec![])), IoPlanError::NoPhases);
        assert!(matches!(
            bad(plan(vec![phase(Pattern::Read, 1000, 1)])),
            IoPlanError::BlockSize { phase: 0, bs: 1000 }
        ));
        assert!(matches!(
            bad(plan(vec![phase(Pattern::Read, 0, 1)])),
            IoPlanError::BlockSize { .. }
        ));
        assert!(matches!(
            bad(plan(vec![
                phase(Pattern::Read, 512, 1),
                phase(Pattern::Read, 512, 0)
            ])),
            IoPlanError::QueueDepth { phase: 1, qd: 0 }
        ));
        let mut p = plan(vec![phase(Pattern::Read, 512, 1)]);
        p.phases[0].runtime_ms = 0;
        assert_eq!(bad(p.clone()), IoPlanError::Runtime(0));
        p.phases[0].runtime_ms = 1;
        p.gap_ms = MAX_GAP_MS + 1;
        assert!(matches!(bad(p.clone()), IoPlanError::Gap(_)));
        p.gap_ms = 0;
        p.dev.clear();
        assert_eq!(bad(p), IoPlanError::NoDevice);
        assert!(IoPlan::from_arg("{").unwrap_err().contains("cannot parse"));
        assert!(
            IoPlan::from_arg(r#"{"dev":"/dev/vda","phases":[],"gap_ms":0,"seed":1}"#)
                .unwrap_err()
                .contains("no phase")
        );
    }

    #[test]
    fn lines_parse_and_others_are_ignored() {
        let end = IoLine {
            t_us: 1_500_000,
            event: IoEvent::End {
                phase: 2,
                result: PhaseResult {
                    ios: 100,
                    errors: 0,
                    bytes: 409_600,
                    secs: 0.5,
                    p50_us: 40.0,
                    p99_us: 90.0,
                    max_us: 120.0,
                },
            },
        };
        let text = end.to_line();
        assert!(
            text.starts_with("{\"t_us\":1500000,\"io\":\"end\""),
            "{text}"
        );
        assert_eq!(IoLine::parse(&format!("  {text}\r")), Some(end));
        assert_eq!(
            IoLine::parse(r#"{"io":"begin","phase":0,"t_us":7}"#),
            Some(IoLine {
                t_us: 7,
                event: IoEvent::Begin { phase: 0 }
            })
        );
        assert_eq!(IoLine::parse("hello"), None);
        assert_eq!(IoLine::parse(r#"{"io":"unknown","t_us":1}"#), None);
        assert_eq!(IoLine::parse(r#"{"io":"begin","phase":-1,"t_us":1}"#), None);
        assert_eq!(IoLine::parse(r#"{"io":"begin","phase":1}"#), None);
    }

    #[test]
    fn results_give_rates_and_percentiles_by_rank() {
        let r = PhaseResult {
            ios: 200,
            bytes: 200 << 20,
            secs: 2.0,
            ..PhaseResult::default()
        };
        assert_eq!(r.iops(), 100.0);
        assert_eq!(r.mib_s(), 100.0);
        assert_eq!(PhaseResult::default().iops(), 0.0);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
