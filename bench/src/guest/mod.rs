//! `--guest`: the figures a real guest sees. For each backend in turn (vloop-blk,
//! qemu-storage-daemon from an iothread, and optionally from its main loop), a guest boots
//! through the harness library (`vloop_harness::exec_with`) with the benchmark image as its
//! one virtio-blk disk, served in the same cache mode by every backend, and runs the agent's
//! I/O tool (`vloop_guest::io`): the same phases in the same order, each with O_DIRECT in the
//! guest. The tool prints a line as each phase begins and ends; the host reads the backend's
//! CPU time from /proc when each line arrives, so every phase has the guest's time and
//! throughput and the backend's CPU over it. Backends take turns across rounds.
//!
//! Bottom up: [`options`] says what to measure, [`stats`] turns what the host saw into
//! figures and ratios (pure), [`report`] holds them, [`boot`] boots one guest and collects what
//! it shows, [`run`](mod@run) does the rounds, [`render`] makes the text table.

pub mod boot;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod options;
pub mod render;
pub mod report;
pub mod run;
pub mod stats;

use vloop_guest::io::IoPlanError;
use vloop_harness::setup::SetupError;

pub use options::{
    default_phases, phase_of, phases, targets, GuestOptions, GUEST_CPUS, GUEST_DEVICE,
};
pub use render::render;
pub use report::{Boot, GuestBackend, GuestReport, PhaseRow};
pub use run::run;
pub use stats::{Lateness, Mark, PhaseRound, PhaseSummary};

use crate::images::ImageError;
use crate::machine::MachineError;

/// Errors that keep the guest comparison from running at all (a failed guest is recorded in
/// the report instead).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The null mode has no guest form.
    #[error(
        "--guest runs in a cache mode (the page cache, or O_DIRECT with --direct), not --null"
    )]
    NullMode,
    /// A mixed workload has no phase of the guest's tool.
    #[error("--guest runs read, write, randread or randwrite phases")]
    Mixed,
    /// The guest's disk has one queue.
    #[error("--guest drives one virtio-blk queue: --queues must be 1")]
    Queues,
    /// The phases cannot be run.
    #[error("the guest phases cannot be run")]
    Plan(#[source] IoPlanError),
    /// The image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
    /// The guests cannot be set up (QEMU, kernel, guest agent, busybox).
    #[error("cannot set up the guests")]
    Setup(#[source] SetupError),
}
