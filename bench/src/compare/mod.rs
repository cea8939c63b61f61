//! `--compare`: the same workloads on vloop-blk, on qemu-storage-daemon (from its main loop and
//! from an iothread) and straight on the image file with io_uring, one target at a time
//! (vloop-blk locks the image), in the same cache mode everywhere, interleaved and repeated;
//! or, in null mode, vloop-blk's null engine against qemu-storage-daemon's `null-co` driver;
//! or, in qcow2 mode, vloop-blk and qemu-storage-daemon on a fully allocated qcow2 copy of the
//! image (and on empty overlays over it) against vloop-blk on the raw image.
//! It also measures each backend idle with a frontend connected, and the machine's load.
//!
//! Bottom up: [`options`] says what to measure, [`stats`] summarises and compares the figures
//! (pure), [`report`] holds them, [`backend`] starts, measures and stops one backend,
//! [`run`](mod@run) does the measuring, [`render`] turns a [`Report`] into the text table;
//! `crate::images` prepares what is served and `crate::plot` draws the report.

pub mod backend;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod options;
pub mod render;
pub mod report;
pub mod run;
pub mod stats;

pub use options::{cases, default_workloads, qcow2_cases, Case, CompareOptions, ImageState};
pub use render::render;
pub use report::{BackendFacts, Idle, Report, Row, TargetImage};
pub use run::run;
pub use stats::{Footprint, Ratios, Round, Summary};

pub use crate::images::{ImageError, Qcow2Image};
use crate::machine::MachineError;
pub use crate::target::{Mode, Target};

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// An image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The socket directory could not be created.
    #[error("cannot create a temporary directory for the sockets")]
    TempDir(#[source] std::io::Error),
    /// No workloads were given.
    #[error("no workloads to compare")]
    NoWorkloads,
    /// The qcow2 mode was asked for together with the null mode.
    #[error("the qcow2 mode serves images: it cannot be combined with the null mode")]
    Qcow2Null,
    /// A workload on an empty overlay was asked for outside the qcow2 mode.
    #[error("{0} runs on an empty qcow2 overlay: that needs the qcow2 mode")]
    OverlayWithoutQcow2(String),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
}
