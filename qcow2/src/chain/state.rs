//! The chain's shared state: its files, the metadata behind the lock, and the accessors and
//! error helpers every operation uses.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use super::error::{Error, Result};
use super::options::LayerId;
use crate::format::Format;
use crate::layer::{LayerError, Qcow2};
use crate::storage::Storage;

/// A file of the chain.
pub(super) struct LayerFile {
    pub(super) st: Box<dyn Storage>,
    pub(super) fd: RawFd,
    pub(super) path: PathBuf,
    pub(super) format: Format,
    /// Virtual size (a raw layer: its length).
    pub(super) size: u64,
}

/// Metadata behind the chain's lock.
pub(super) struct Meta {
    /// One per layer; `None` for raw layers.
    pub(super) q: Vec<Option<Qcow2>>,
    /// Sequence number of the next free.
    pub(super) seq: u64,
}

/// A qcow2 backing chain (or a raw image) as one virtual disk.
pub struct Chain {
    pub(super) files: Vec<LayerFile>,
    pub(super) meta: Mutex<Meta>,
    pub(super) alloc: Mutex<()>,
    pub(super) read_only: bool,
    pub(super) probed_raw: bool,
    pub(super) punch_freed: bool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Chain {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.files[0].size
    }

    /// The top image's format.
    pub fn format(&self) -> Format {
        self.files[0].format
    }

    /// Whether the top image's format was probed and found raw: the caller must then check
    /// writes to the first sector with [`crate::probed_raw_write`].
    pub fn probed_raw(&self) -> bool {
        self.probed_raw
    }

    /// Whether the chain is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Number of layers (1: no backing file).
    pub fn layers(&self) -> usize {
        self.files.len()
    }

    /// The cluster size of the top image (`None`: it is raw).
    pub fn cluster_size(&self) -> Option<u64> {
        lock(&self.meta).q[0].as_ref().map(|q| q.geo.cluster_size())
    }

    /// The descriptor of each layer's file, top first (for registering them with io_uring).
    pub fn fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.fd).collect()
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    pub(super) fn layer_err(&self, k: LayerId) -> impl FnOnce(LayerError) -> Error + '_ {
        move |source| Error::Layer {
            path: self.files[k].path.clone(),
            source,
        }
    }

    pub(super) fn io_err(
        &self,
        k: LayerId,
        what: &'static str,
        offset: u64,
    ) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Io {
            what,
            path: self.files[k].path.clone(),
            offset,
            source,
        }
    }
}
