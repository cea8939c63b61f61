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
//! [`run`](mod@run) does the measuring, [`render`](mod@render) turns a [`Report`] into the
//! text table. The images served are prepared by `crate::images`; the chart is drawn above
//! this module, from its report.

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
pub use run::{run, CompareError};
pub use stats::{Footprint, Ratios, Round, Summary};
