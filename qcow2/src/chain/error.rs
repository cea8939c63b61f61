//! The chain's error type: what can go wrong opening a chain or doing I/O through it.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::options::MAX_CHAIN;
use crate::compress::CompressError;
use crate::format::ProbeError;
use crate::layer::LayerError;

/// Errors of a chain.
#[derive(Debug, Error)]
pub enum Error {
    /// The metadata of a qcow2 layer is invalid, or reading or writing it failed.
    #[error("{}", path.display())]
    Layer {
        /// The layer's file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: LayerError,
    },
    /// Reading or writing data failed.
    #[error("{what} of {} at byte {offset:#x} failed", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// File offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A backing file could not be opened.
    #[error("cannot open backing file {} (named by {})", path.display(), by.display())]
    OpenBacking {
        /// The backing file.
        path: PathBuf,
        /// The image naming it.
        by: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Probing found a format this crate does not read.
    #[error("{}", path.display())]
    Probe {
        /// The file probed.
        path: PathBuf,
        /// What it looks like.
        #[source]
        source: ProbeError,
    },
    /// A backing format name this crate does not read.
    #[error("{} names backing format {name:?}, which is not supported (only raw and qcow2)", by.display())]
    BackingFormat {
        /// The format name.
        name: String,
        /// The image naming it.
        by: PathBuf,
    },
    /// The backing file name is not usable.
    #[error("{} names an empty backing file", by.display())]
    BackingName {
        /// The image naming it.
        by: PathBuf,
    },
    /// A raw top image was given a backing file.
    #[error("a raw image cannot have a backing file")]
    RawBacking,
    /// The chain has more than [`MAX_CHAIN`] layers.
    #[error("the backing chain of {} is longer than {MAX_CHAIN} images", top.display())]
    TooLong {
        /// The top image.
        top: PathBuf,
    },
    /// The same file appears twice in the chain.
    #[error("the backing chain loops: {} is already in the chain", path.display())]
    Loop {
        /// The file seen twice.
        path: PathBuf,
    },
    /// A request outside the virtual disk.
    #[error("request of {len} bytes at {offset} is outside the {size}-byte disk")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A write to a read-only chain.
    #[error("the image is open read-only")]
    ReadOnly,
    /// A compressed cluster is invalid.
    #[error("{} at host byte {host:#x}", path.display())]
    Compressed {
        /// The file.
        path: PathBuf,
        /// Host offset of the compressed data.
        host: u64,
        /// What is wrong.
        #[source]
        source: CompressError,
    },
    /// Compressed data that lies past the end of its file.
    #[error("compressed cluster at {host:#x} of {} lies past the end of the file; the image is corrupt", path.display())]
    CompressedPastEnd {
        /// The file.
        path: PathBuf,
        /// Host offset.
        host: u64,
    },
}

/// Result of chain operations.
pub type Result<T> = std::result::Result<T, Error>;
