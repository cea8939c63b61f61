//! The error type of one qcow2 layer's metadata, and the helper that wraps I/O errors in it.

use std::io;

use thiserror::Error;

use crate::header::HeaderError;
use crate::table::TableError;

/// Errors of one qcow2 layer's metadata.
#[derive(Debug, Error)]
pub enum LayerError {
    /// Reading or writing the image failed.
    #[error("{what} at byte {offset:#x} failed")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// File offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header is invalid or its features forbid the open.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A table entry is invalid.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A table lies (partly) past the end of the file.
    #[error("the {what} at {offset:#x} ({len} bytes) lies past the end of the file ({file_len} bytes); the image is corrupt or truncated")]
    PastEnd {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A table overlaps other metadata (the header, the L1 or the refcount table).
    #[error("the {what} at {offset:#x} overlaps other metadata; the image is corrupt (`qemu-img check -r all`)")]
    Overlap {
        /// Which table or cluster.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A metadata cluster (the header, a table, a refcount block) has a refcount of zero.
    #[error("the metadata cluster at {0:#x} has a refcount of zero; the image is corrupt (`qemu-img check -r all`)")]
    Uncounted(u64),
    /// A refcount would drop below zero: the image counts fewer references than it has.
    #[error("the refcount of cluster {0:#x} would drop below zero; the image is corrupt (`qemu-img check -r all`)")]
    RefcountUnderflow(u64),
    /// An L2 table is shared (refcount above one), which only internal snapshots do.
    #[error("the L2 table at {0:#x} is shared (internal snapshots); writing it is not supported")]
    SharedL2(u64),
    /// The refcount table cannot grow past QEMU's 8 MiB limit.
    #[error("the image is full: its refcount table would exceed 8 MiB")]
    Full,
    /// A data cluster that an L2 entry names is metadata of the image.
    #[error("an L2 entry points to host cluster {0:#x}, which holds metadata; the image is corrupt (`qemu-img check -r all`)")]
    DataInMetadata(u64),
    /// An allocation was asked of an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, LayerError>;

pub(super) fn io_err(what: &'static str, offset: u64) -> impl FnOnce(io::Error) -> LayerError {
    move |source| LayerError::Io {
        what,
        offset,
        source,
    }
}

/// Checks that the `what` of `len` bytes at `offset` lies inside a file of `file_len` bytes.
pub(super) fn check_inside(what: &'static str, offset: u64, len: u64, file_len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(LayerError::PastEnd {
            what,
            offset,
            len,
            file_len,
        });
    }
    Ok(())
}
