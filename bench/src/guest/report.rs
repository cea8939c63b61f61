//! The report of a guest comparison as the table and the JSON read it: a row per phase with
//! each backend's summary and the ratios, every guest booted, each backend's command line,
//! the guests' accelerator and kernel, the machine and its load. `run` fills it in.

use std::path::PathBuf;

use vloop_guest::io::IoPhase;
use vloop_harness::accel::Accel;

use super::stats::PhaseSummary;
use crate::figures::QsdRatios;
use crate::machine::{LoadSpan, Machine};
use crate::target::{Mode, Target};

/// One row of the table: a phase on every backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseRow {
    /// Phase name (`4k randread QD1`).
    pub name: String,
    /// The phase.
    pub phase: IoPhase,
    /// vloop-blk.
    pub vloop: PhaseSummary,
    /// qemu-storage-daemon, main loop.
    pub qsd: Option<PhaseSummary>,
    /// qemu-storage-daemon, iothread.
    pub qsd_iothread: Option<PhaseSummary>,
    /// vloop against the better qsd.
    #[serde(flatten)]
    pub ratios: QsdRatios,
}

impl PhaseRow {
    /// The row of `phase` with an empty summary for each of `targets`.
    pub(super) fn new(phase: &IoPhase, targets: &[Target]) -> Self {
        let has = |t| targets.contains(&t).then(PhaseSummary::default);
        PhaseRow {
            name: phase.name(),
            phase: *phase,
            vloop: PhaseSummary::default(),
            qsd: has(Target::Qsd),
            qsd_iothread: has(Target::QsdIothread),
            ratios: QsdRatios::default(),
        }
    }

    /// The summary of `t`, when it was measured.
    pub fn get(&self, t: Target) -> Option<&PhaseSummary> {
        match t {
            Target::Vloop => Some(&self.vloop),
            Target::Qsd => self.qsd.as_ref(),
            Target::QsdIothread => self.qsd_iothread.as_ref(),
            Target::Raw | Target::VloopRaw => None,
        }
    }

    /// The summary of `t` to add a round to, when it is measured.
    pub(super) fn get_mut(&mut self, t: Target) -> Option<&mut PhaseSummary> {
        match t {
            Target::Vloop => Some(&mut self.vloop),
            Target::Qsd => self.qsd.as_mut(),
            Target::QsdIothread => self.qsd_iothread.as_mut(),
            Target::Raw | Target::VloopRaw => None,
        }
    }

    /// Takes the row's ratios from its summaries.
    pub fn set_ratios(&mut self) {
        self.ratios = QsdRatios::of(
            &self.vloop,
            &[
                (Target::Qsd, self.qsd.as_ref()),
                (Target::QsdIothread, self.qsd_iothread.as_ref()),
            ],
        );
    }
}

/// One guest: a backend in a round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Boot {
    /// Round number, from 1.
    pub round: u32,
    /// The backend.
    pub target: Target,
    /// The 1-minute load average when it started.
    pub load_before: Option<f64>,
    /// The harness's exit status (the I/O tool's, or 125 when the run failed).
    pub status: u8,
    /// How the tool ended, in words.
    pub detail: String,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// Seconds from QEMU's start until the agent was ready.
    pub boot_s: Option<f64>,
    /// Seconds the I/O tool ran, by the guest's clock.
    pub command_s: Option<f64>,
    /// Seconds of the whole run.
    pub total_s: f64,
    /// The disk's size as the guest saw it.
    pub device_bytes: Option<u64>,
    /// The backend's peak resident set (VmHWM, KiB) at the end of the last phase.
    pub peak_rss_kib: Option<u64>,
    /// The run's folder (logs), kept when the run failed.
    pub kept: Option<PathBuf>,
}

impl Boot {
    /// Whether the guest ran every phase and the run had no problem.
    pub fn ok(&self) -> bool {
        self.status == 0 && self.error.is_none()
    }
}

/// A backend's command line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestBackend {
    /// Which backend.
    pub target: Target,
    /// Its command line (`SOCKET` stands for the socket the harness gives it).
    pub command: Vec<String>,
}

/// The whole guest comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestReport {
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// The host's cache mode on every backend.
    pub mode: Mode,
    /// O_DIRECT on the host (every backend).
    pub direct: bool,
    /// The machine.
    pub machine: Machine,
    /// The load average before and after.
    pub load: LoadSpan,
    /// The guests' accelerator.
    pub accel: Accel,
    /// Why that accelerator.
    pub accel_why: String,
    /// The guest kernel.
    pub kernel: String,
    /// vCPUs per guest.
    pub guest_cpus: u32,
    /// Guest memory in MiB.
    pub guest_mem_mib: u32,
    /// How the guest does its I/O.
    pub guest_io: String,
    /// Image path.
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Rounds done.
    pub rounds: u32,
    /// Rounds asked for.
    pub rounds_requested: u32,
    /// The tool's gap around each phase, in milliseconds.
    pub gap_ms: u64,
    /// The backends, in table order.
    pub targets: Vec<Target>,
    /// One row per phase.
    pub rows: Vec<PhaseRow>,
    /// Every guest.
    pub boots: Vec<Boot>,
    /// Each backend's command line.
    pub backends: Vec<GuestBackend>,
    /// Whether Ctrl-C or SIGTERM cut the comparison short.
    pub interrupted: bool,
    /// Wall time in seconds.
    pub wall_secs: f64,
}
