//! The report of a comparison as the table, the chart and the JSON read it: a row per
//! workload with each target's summary and the ratios, what each target serves, each
//! backend's command line, memory and idle CPU, the machine and its load. `run` fills it in.

use std::path::PathBuf;

use super::options::{Case, ImageState};
use super::stats::{Ratios, Summary};
use crate::images::Qcow2Image;
use crate::load::Workload;
use crate::machine::{LoadSpan, Machine};
use crate::procfs::ThreadShare;
use crate::target::{Mode, Target};

/// One row of the table: a workload on every target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Row name: the workload's, with " overlay" on an empty overlay.
    pub name: String,
    /// The workload.
    pub workload: Workload,
    /// What it runs on.
    pub on: ImageState,
    /// vloop-blk.
    pub vloop: Summary,
    /// qemu-storage-daemon, main loop.
    pub qsd: Option<Summary>,
    /// qemu-storage-daemon, iothread.
    pub qsd_iothread: Option<Summary>,
    /// io_uring on the file.
    pub raw: Option<Summary>,
    /// vloop-blk on the raw image (qcow2 mode).
    pub vloop_raw: Option<Summary>,
    /// vloop against the better qsd, raw and vloop-raw.
    #[serde(flatten)]
    pub ratios: Ratios,
}

impl Row {
    /// The row of `c` with an empty summary for each of `targets`.
    pub(super) fn new(c: &Case, targets: &[Target]) -> Self {
        let has = |t| targets.contains(&t).then(Summary::default);
        Row {
            name: c.to_string(),
            workload: c.workload,
            on: c.on,
            vloop: Summary::default(),
            qsd: has(Target::Qsd),
            qsd_iothread: has(Target::QsdIothread),
            raw: has(Target::Raw),
            vloop_raw: has(Target::VloopRaw),
            ratios: Ratios::default(),
        }
    }

    /// The summary of `t`, when it was measured.
    pub fn get(&self, t: Target) -> Option<&Summary> {
        match t {
            Target::Vloop => Some(&self.vloop),
            Target::Qsd => self.qsd.as_ref(),
            Target::QsdIothread => self.qsd_iothread.as_ref(),
            Target::Raw => self.raw.as_ref(),
            Target::VloopRaw => self.vloop_raw.as_ref(),
        }
    }

    /// The summary of `t` to add a run to, when it is measured.
    pub(super) fn get_mut(&mut self, t: Target) -> Option<&mut Summary> {
        match t {
            Target::Vloop => Some(&mut self.vloop),
            Target::Qsd => self.qsd.as_mut(),
            Target::QsdIothread => self.qsd_iothread.as_mut(),
            Target::Raw => self.raw.as_mut(),
            Target::VloopRaw => self.vloop_raw.as_mut(),
        }
    }

    /// Takes the row's ratios from its summaries.
    pub fn set_ratios(&mut self) {
        self.ratios = Ratios::of(
            &self.vloop,
            self.qsd.as_ref(),
            self.qsd_iothread.as_ref(),
            self.raw.as_ref(),
            self.vloop_raw.as_ref(),
        );
    }
}

/// A backend measured idle: a frontend connected, its queues set up, no request.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Idle {
    /// Queues set up.
    pub queues: u16,
    /// Seconds measured.
    pub secs: f64,
    /// CPU used, in percent of one CPU (the sum of its threads' exact run times).
    pub cpu_pct: Option<f64>,
    /// The same in clock ticks of /proc/PID/stat (10 ms resolution; counts exited threads).
    pub cpu_pct_ticks: Option<f64>,
    /// Percent of one CPU by thread name.
    pub threads: Vec<ThreadShare>,
    /// Resident set (VmRSS, KiB) at the end.
    pub rss_kib: Option<u64>,
    /// Why the measurement failed, if it did.
    pub failure: Option<String>,
}

/// What one target serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetImage {
    /// Which target.
    pub target: Target,
    /// The format it serves: `raw` or `qcow2`.
    pub format: &'static str,
    /// The image of the rows on the prepared image.
    pub image: PathBuf,
    /// What the rows on an empty overlay serve instead, made fresh for every run (None when
    /// no row does).
    pub empty_overlay: Option<String>,
}

/// What is known of one backend program over the whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendFacts {
    /// Which backend.
    pub target: Target,
    /// The command line of its first start.
    pub command: Vec<String>,
    /// Resident set (VmRSS, KiB) right after start-up, before any frontend connected.
    pub idle_rss_kib: Option<u64>,
    /// Greatest peak resident set (VmHWM, KiB) of one export over every run of it, idle
    /// included; it counts the guest memory pages the backend touched.
    pub peak_rss_kib: Option<u64>,
    /// Greatest anonymous resident memory (RssAnon, KiB) at the end of a run: the backend's own
    /// memory, without the guest memory it maps.
    pub anon_rss_kib: Option<u64>,
    /// Idle CPU, when measured.
    pub idle: Option<Idle>,
}

/// The whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// When the comparison started (RFC 3339, UTC).
    pub started: String,
    /// Cache mode, or null.
    pub mode: Mode,
    /// O_DIRECT on every side.
    pub direct: bool,
    /// The qcow2 mode's fully allocated copy of the image (None outside that mode).
    pub qcow2: Option<Qcow2Image>,
    /// The machine.
    pub machine: Machine,
    /// The load average before and after the measurements.
    pub load: LoadSpan,
    /// Image path.
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Rounds done.
    pub rounds: u32,
    /// Rounds asked for (fewer are done when the time budget runs out).
    pub rounds_requested: u32,
    /// The targets measured.
    pub targets: Vec<Target>,
    /// What each target serves, and in which format.
    pub images: Vec<TargetImage>,
    /// Rows, one per workload.
    pub rows: Vec<Row>,
    /// One entry per backend program.
    pub backends: Vec<BackendFacts>,
    /// Wall time of the comparison in seconds.
    pub wall_secs: f64,
}

impl Report {
    /// The facts of backend `t`.
    pub fn backend(&self, t: Target) -> Option<&BackendFacts> {
        self.backends.iter().find(|b| b.target == t)
    }
}
