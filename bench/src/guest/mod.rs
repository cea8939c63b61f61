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
//! it shows, [`run`](mod@run) does the rounds, [`render`](mod@render) makes the text table.

pub mod boot;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod options;
pub mod render;
pub mod report;
pub mod run;
pub mod stats;

pub use options::{
    default_phases, phase_of, phases, targets, GuestOptions, PhaseError, GUEST_CPUS, GUEST_DEVICE,
};
pub use render::render;
pub use report::{Boot, GuestBackend, GuestReport, PhaseRow};
pub use run::{run, GuestError};
pub use stats::{Lateness, Mark, PhaseRound, PhaseSummary};
