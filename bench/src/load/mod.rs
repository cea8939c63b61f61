//! The load generator: a workload (pattern, block size, depth, queues, duration) run either
//! through a vhost-user-blk backend with `vloop_frontend::client` or straight on the image file
//! with io_uring, one thread per queue, keeping `iodepth` requests in flight per queue.
//!
//! Bottom up: [`workload`] says what each request is (pure), [`result`] what a run returns,
//! `drive` is the loop every queue runs, [`vhost`] and [`raw`] are its two engines.

mod drive;
pub mod raw;
pub mod result;
pub mod vhost;
pub mod workload;

pub use raw::run_raw;
pub use result::{LoadError, RunResult};
pub use vhost::{client_options, run_vhost, run_vhost_with};
pub use workload::{OffsetGen, Pattern, Rng, Workload, WorkloadError, WorkloadWords};
