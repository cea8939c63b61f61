//! vloop-blk: a vhost-user-blk backend that serves a disk-image file (or block device) to a
//! QEMU guest as a virtio block device.
//!
//! Layers, bottom up:
//! - [`request`]: pure parsing and validation of virtio-blk descriptor chains;
//! - [`lock`]: QEMU-compatible image locking;
//! - [`disk`]: the open image and its non-data operations (flush, discard, write zeroes);
//! - [`io`]: the executor that runs batches of requests on io_uring (or blocking syscalls);
//! - [`inflight`]: inflight I/O tracking, so a restarted backend resubmits what was in flight;
//! - [`device`]: the vhost-user-backend device (features, config space, worker threads);
//! - [`daemon`]: the listening socket, reconnection and clean shutdown.

pub mod config;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod inflight;
pub mod io;
pub mod lock;
pub mod request;

pub use self::config::{BlockSize, Config, ConfigError, DiscardMode, EngineKind, Listen};
pub use self::daemon::{bind, start_backend, stop_on_signals, Daemon, DaemonError, StopHandle};
pub use self::device::{config_space, device_features, BlkDevice, DeviceError};
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
