//! What a load run returns and how it fails: each queue's share (`Part`), the run's
//! figures summed over its queues ([`RunResult`]: requests, rates, latency percentiles, the
//! CPU per request of the backend and of this process), and its errors.

use std::time::Duration;

use vloop_frontend::client::{ClientError, QueueStats};
use vloop_frontend::mem::MemError;

use super::workload::{Workload, WorkloadError};
use crate::hist::{LatencyHist, Percentiles};
use crate::procfs::{CpuUsed, ThreadShare};

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The vhost-user client failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The workload does not fit the device or file.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// The image file could not be opened.
    #[error("cannot open {path} for the raw io_uring run")]
    Open {
        /// Image path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// io_uring set-up or submission failed.
    #[error("io_uring {op} failed")]
    Uring {
        /// What failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Buffer memory could not be allocated.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A worker thread panicked.
    #[error("a load thread panicked")]
    Thread,
}

/// Result of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Completed requests.
    pub ios: u64,
    /// Requests completed with a non-OK status or an error.
    pub errors: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time from the first submission to the last completion, in seconds.
    pub secs: f64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency summary.
    pub latency: Percentiles,
    /// Backend CPU time per request in microseconds, when the backend PID is known.
    pub backend_cpu_us_per_io: Option<f64>,
    /// CPU time of this process (the frontend, or the raw io_uring engine) per request, in
    /// microseconds.
    pub client_cpu_us_per_io: Option<f64>,
    /// Backend CPU time per request in microseconds by thread name (digits dropped, so the
    /// kernel's `iou-sqp-` and `iou-wrk-` threads of io_uring are one entry each), largest
    /// first; threads that exited before the end of the run are left out.
    pub backend_threads: Vec<ThreadShare>,
    /// Frontend counters summed over the queues (zero for raw runs).
    pub frontend: QueueStats,
    /// The latency histogram.
    #[serde(skip)]
    pub hist: LatencyHist,
}

impl From<WorkloadError> for LoadError {
    /// A workload that does not fit the device or file.
    fn from(e: WorkloadError) -> Self {
        LoadError::Workload(e.to_string())
    }
}

/// One queue's share of a run.
pub(super) struct Part {
    /// Completed requests.
    pub ios: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// Their latencies.
    pub hist: LatencyHist,
    /// The queue's counters.
    pub stats: QueueStats,
}

/// What the queues of one run did, with its wall time and this process's CPU over it.
pub(super) struct Ran {
    /// Each queue's share, in queue order.
    pub parts: Vec<Part>,
    /// Seconds from the start of the first queue to the end of the last.
    pub secs: f64,
    /// This process's CPU time over the run.
    pub client_cpu: Option<Duration>,
}

impl RunResult {
    /// What a run of `w` did, in a few lines for a terminal.
    pub fn text(&self, w: &Workload) -> String {
        let l = self.latency;
        let mut o = format!(
            "{w}: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} I/Os in {:.2} s, {} errors)\n",
            self.iops, self.mib_s, l.p50_us, l.p99_us, l.p999_us, self.ios, self.secs, self.errors
        );
        if let Some(c) = self.backend_cpu_us_per_io {
            o += &format!("backend CPU: {c:.2} us per I/O\n");
        }
        if let Some(c) = self.client_cpu_us_per_io {
            o += &format!("this process's CPU: {c:.2} us per I/O\n");
        }
        if self.frontend.submitted > 0 {
            let n = self.frontend.submitted as f64;
            o += &format!(
                "notifications: {:.3} kicks and {:.3} call waits per I/O\n",
                self.frontend.kicks as f64 / n,
                self.frontend.waits as f64 / n
            );
        }
        o
    }

    /// The result of the queues' parts of a run of `bs`-byte requests, with the CPU the
    /// `backend` used over it where it was measured.
    pub(super) fn build(ran: Ran, bs: u32, backend: Option<CpuUsed>) -> Self {
        let backend = backend.unwrap_or_default();
        let mut hist = LatencyHist::new();
        let (mut ios, mut errors) = (0, 0);
        let mut frontend = QueueStats::default();
        for p in &ran.parts {
            hist.merge(&p.hist);
            ios += p.ios;
            errors += p.errors;
            frontend.submitted += p.stats.submitted;
            frontend.kicks += p.stats.kicks;
            frontend.waits += p.stats.waits;
            frontend.calls += p.stats.calls;
        }
        let bytes = ios * u64::from(bs);
        let secs = ran.secs.max(1e-9);
        let per_io = |c: Duration| c.as_secs_f64() * 1e6 / ios as f64;
        Self {
            ios,
            errors,
            bytes,
            secs,
            iops: ios as f64 / secs,
            mib_s: bytes as f64 / secs / f64::from(1u32 << 20),
            latency: hist.percentiles(),
            backend_cpu_us_per_io: backend.ticks.filter(|_| ios > 0).map(per_io),
            client_cpu_us_per_io: ran.client_cpu.filter(|_| ios > 0).map(per_io),
            backend_threads: if ios > 0 {
                backend.shares(|ns| ns as f64 / 1e3 / ios as f64)
            } else {
                Vec::new()
            },
            frontend,
            hist,
        }
    }
}
