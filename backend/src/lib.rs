//! vloop-blk: a vhost-user-blk backend that serves a disk-image file (or block device) to a
//! QEMU guest as a virtio block device.
//!
//! Layers, bottom up (each module imports only from the ones above it in this list):
//! - [`config`]: the typed options of one export;
//! - [`request`]: pure parsing and validation of virtio-blk descriptor chains;
//! - [`virtio_blk`]: the device offered: feature bits, limits, config space;
//! - [`lock`]: QEMU-compatible image locking;
//! - [`disk`]: the open image: its format (never guessed from guest data), qcow2 chain, size,
//!   serial, limits, flush state;
//! - [`io`]: the executor that runs a queue's requests on io_uring (or blocking syscalls);
//! - [`poll`]: adaptive polling of a queue's available ring between requests;
//! - [`inflight`]: inflight I/O tracking, so a restarted backend resubmits what was in flight;
//! - [`fault`]: recovery from guest memory that shrinks under the daemon (SIGBUS);
//! - [`protocol`]: vhost-user framing, descriptor checks, the backend request channel and the
//!   relay in front of vhost-user-backend;
//! - [`device`]: the vhost-user-backend device (features, config space, worker threads);
//! - [`connection`]: one frontend, from accept to disconnect;
//! - [`daemon`]: the listening socket, one connection after another, clean shutdown.

pub mod config;
pub mod connection;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod fault;
pub mod inflight;
pub mod io;
pub mod lock;
pub mod poll;
pub mod protocol;
pub mod request;
pub mod virtio_blk;

pub use self::config::{BlockSize, Config, ConfigError, DiscardMode, EngineKind, Listen, Locking};
pub use self::connection::{Connection, ConnectionError};
pub use self::daemon::{bind, start_backend, stop_on_signals, Daemon, DaemonError, StopHandle};
pub use self::device::{BlkDevice, DeviceError};
pub use self::disk::{Disk, DiskError};
pub use self::io::{Completion, Executor, GuestMem, Stats};
pub use self::lock::{lock_image, LockError, LockMode};
pub use self::request::{parse, Limits, Rejected, Request, RequestError, RequestKind};

/// Locking that survives a poisoned mutex: every mutex of the daemon guards plain state that
/// stays consistent if a thread panicked while holding it, and one failed request must not
/// stop the others.
pub(crate) trait LockUnpoisoned<T: ?Sized> {
    /// The guard, poisoned or not.
    fn lock_unpoisoned(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T: ?Sized> LockUnpoisoned<T> for std::sync::Mutex<T> {
    fn lock_unpoisoned(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}
