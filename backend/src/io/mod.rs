//! The I/O layer: requests of one queue executed on the image.
//!
//! - [`executor`]: the pipeline of one queue (pop, parse, start, complete, publish), and its
//!   `plan` step, the format layer: a parsed request becomes ops on the image's files (one
//!   for raw, one per extent of a qcow2 mapping), work for the slow path, or a completion;
//! - [`guest`]: descriptor chains and small objects in guest memory, on the fast path;
//! - [`store`]: the requests in flight and their stages;
//! - [`share`]: how much of a saturated worker's page-cache reads go to a helper CPU;
//! - [`slow`]: the thread of a queue's slow requests (qcow2 allocation, metadata updates);
//! - [`engine`]: the I/O engines (io_uring, blocking, null);
//! - `uring`: the io_uring engine;
//! - [`blocking`]: operations run with plain syscalls (the blocking engine, and what the
//!   ring leaves to finish);
//! - [`op`]: the operations an engine runs, and what starting one did;
//! - [`ratelimit`]: the budget of log lines a guest can cause.
//!
//! This layer knows nothing of vhost-user or inflight tracking: what the layers above need
//! to see of the queue (which chains are taken and returned) they get through [`Tracker`].

pub mod blocking;
pub mod engine;
pub mod executor;
pub mod guest;
pub mod op;
pub mod ratelimit;
pub mod share;
pub mod slow;
pub mod store;
#[cfg(test)]
mod tests;
mod uring;

use vm_memory::GuestMemoryMmap;

pub use self::engine::{Engine, EngineError};
pub use self::executor::Executor;
pub use self::op::{Iovecs, Op, OpKind, IOV_MAX};
pub use self::ratelimit::{Causes, Pool, RateLimiter};

/// Guest memory as the backend maps it (no dirty-page bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// How many guest-caused warnings one queue may log per second.
pub const WARNINGS_PER_SECOND: u32 = 5;

/// The outcome of one chain: what goes into the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes written into the chain's device-writable buffers (data + status).
    pub len: u32,
    /// The status byte written (or that would have been, if the chain had no status byte).
    pub status: u8,
}

/// Counters of one executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests completed.
    pub requests: u64,
    /// Requests that did not complete with OK.
    pub errors: u64,
    /// Batches processed.
    pub batches: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Times the worker blocked until image I/O (not page-cache copies on the helper) completed,
    /// or an inline write slept in the file system.
    pub waits: u64,
    /// Rings of the driver's doorbell seen while a pass watched it (see
    /// `Executor::set_doorbell`); a kick left from before the pass rings once too.
    pub doorbells: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.batches += o.batches;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.waits += o.waits;
        self.doorbells += o.doorbells;
    }
}

/// What a layer above wants to know of a queue's chains (inflight tracking keeps them in
/// memory the frontend holds across backend restarts).
pub trait Tracker {
    /// The chain with head `head` was taken from the available ring.
    fn taken(&self, head: u16);
    /// These heads are about to be put in the used ring, in this order.
    fn completing(&self, heads: &[u16]);
    /// They are in the used ring, whose next index is now `used_idx`.
    fn completed(&self, heads: &[u16], used_idx: u16);
}
